import sys

from titans_pretrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
