"""Brazilian-Portuguese task suites as data and lm-eval task YAML."""
