"""The runtimes that carry the same protocol: ``embedded`` (every site and the coordinator in
one process, the README's demo) and ``flower`` (Flower's deployment engine: a SuperLink at the
coordinator, one SuperNode per hospital).

Each runtime is a thin layer around the core: it moves the core's bytes between the
coordinator's side and the sites' side and adds nothing to what may leave a site. Only the
runtimes and the CLI import both sides. Importing this package imports no runtime's
framework.
"""
