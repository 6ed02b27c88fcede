"""The CLI layer: commands that combine several packages (simulate + plot, validate). Only
`moesim.cli` imports these, and only the one whose command runs."""
