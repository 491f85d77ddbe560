"""The site's tamper-evident audit log (:mod:`~blossom_secure.audit.log`: hash chain, Ed25519
signatures, signed checkpoint) and its review (:mod:`~blossom_secure.audit.report`:
terminal table and HTML report)."""
