"""The embedded runtime: the coordinator and the example sites in one process
(:mod:`~blossom_secure.runtimes.embedded.federation`, the README's main command), with the
in-process aggregators (:mod:`~blossom_secure.runtimes.embedded.aggregators`)."""
