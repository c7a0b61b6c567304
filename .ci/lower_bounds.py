"""Print setup.py's lower bounds as pip constraints (``name==version``), for .ci/lowest.sh.

The bounds of ``install_requires`` and of the ``test`` extra; requirements
without a ``>=`` bound are left to the resolver. Standard library only: it
reads setup.py's literal lists without running it.
"""

import ast
import re

call = next(node for node in ast.walk(ast.parse(open("setup.py").read()))
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
arguments = {keyword.arg: keyword.value for keyword in call.keywords}
requirements = (ast.literal_eval(arguments["install_requires"])
                + ast.literal_eval(arguments["extras_require"])["test"])
for requirement in requirements:
    name, specifiers = re.match(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?(.*)", requirement).groups()
    for specifier in specifiers.split(","):
        if specifier.strip().startswith(">="):
            print(f"{name}=={specifier.strip()[2:].strip()}")
