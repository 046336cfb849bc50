"""The commands: one thin module each (arguments, config, exit codes); the work lives in the library folders."""
