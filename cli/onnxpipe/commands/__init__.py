"""One module per subcommand. Each imports only click at module level; the work is imported inside."""
