"""gftvm's Relax passes, importable as ``gftvm.passes`` (setup.cfg maps this folder)."""
