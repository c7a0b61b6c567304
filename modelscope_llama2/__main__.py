import sys

from modelscope_llama2.cli import main

sys.exit(main())
