import sys
from pathlib import Path

# result_factory lives beside the tests, not in a package.
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
