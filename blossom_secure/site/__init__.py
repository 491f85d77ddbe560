"""The hospital's side: everything that runs beside the site's own data.

The site agent (:mod:`~blossom_secure.site.agent`) and the deployed round's site steps
(:mod:`~blossom_secure.site.steps`); the site file (:mod:`~blossom_secure.site.config`) and
policy (:mod:`~blossom_secure.site.policy`); DICOM/CSV loading and the example sites'
synthetic data (:mod:`~blossom_secure.site.data`, :mod:`~blossom_secure.site.synth`); DP
training and its randomness (:mod:`~blossom_secure.site.training`,
:mod:`~blossom_secure.site.dp_random`); the privacy ledger
(:mod:`~blossom_secure.site.ledger`); the egress guard (:mod:`~blossom_secure.site.egress`);
the identity key (:mod:`~blossom_secure.site.keys`) and the saved secure-aggregation round
state (:mod:`~blossom_secure.site.round_state`).

Nothing here imports the coordinator's side (:mod:`blossom_secure.coordinator`); both build
on the shared ground floor and the secure-aggregation core (:mod:`blossom_secure.secagg`).
"""
