import sys
from pathlib import Path

# `tests.cases` is imported by both tiers.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
