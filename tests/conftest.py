"""Makes tests/support importable from every test directory (pytest puts this folder on sys.path)."""
