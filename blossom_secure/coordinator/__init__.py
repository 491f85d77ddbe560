"""The coordinator's side: the round driver of a deployed federation
(:mod:`~blossom_secure.coordinator.steps`) and the round vocabulary both runtimes report in
(:mod:`~blossom_secure.coordinator.rounds`).

Nothing here imports the site's side (:mod:`blossom_secure.site`); both build on the shared
ground floor and the secure-aggregation core (:mod:`blossom_secure.secagg`).
"""
