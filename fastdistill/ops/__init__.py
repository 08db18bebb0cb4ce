"""Public ops: argument checks, autograd wiring and dispatch (no kernel code)."""
