"""Research tools for the tests and benches (quality measures, speech, the old phase
vocoder). Not shipped: a node serves from `worker_node/` alone."""
