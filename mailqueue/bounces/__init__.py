"""Reports that come back after the 250: bounces (DSNs) and complaints (ARF).

Pure functions only, no database and no network: ``parse`` reads one report
into plain data, ``verp`` makes and checks the signed return paths that tie a
report to one recipient row. Storing and applying reports is the store's and
the service layer's job.
"""
