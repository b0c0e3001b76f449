"""Pure tensor math of the method (docs/design.md section 1): no file or network I/O."""
