"""C declarations (``.pxd``) for ferry_native's Cython modules; no Python code."""
