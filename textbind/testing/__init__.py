"""Test helpers: tiny offline models built from configs, no downloads."""
