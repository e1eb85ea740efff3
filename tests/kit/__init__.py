"""Test helpers shared by the test suites (fake services, data builders)."""
