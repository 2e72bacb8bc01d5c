"""Start and drive the development stack: the HAPI dev server, Synapse with the module,
and Matrix clients. Used by the tests, the demo and the benchmarks; not shipped."""
