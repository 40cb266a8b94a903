"""Test doubles of the outside world that several test folders share (real servers, real files)."""
