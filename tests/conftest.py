import os
import sys

# Make `tests.multirank` importable in spawned ranks and from test modules.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
