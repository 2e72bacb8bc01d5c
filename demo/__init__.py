"""`make demo`: the HAPI dev server and Synapse with the module, on the embedded defaults."""
