"""One factory per concern; app.build_app stacks them in one visible place."""
