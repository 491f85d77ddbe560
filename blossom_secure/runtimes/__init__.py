"""Runtimes that carry the federation over a real network.

Each runtime is a thin layer around the pure core: it moves the core's bytes between the
coordinator and the sites and adds nothing to what may leave a site. Importing this
package imports no runtime's framework.
"""
