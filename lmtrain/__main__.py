import sys

from lmtrain.cli import main

sys.exit(main())
