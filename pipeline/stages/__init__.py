"""One module per pipeline stage. Only `main()` does I/O; the algorithms stay pure."""
