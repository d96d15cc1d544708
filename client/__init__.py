"""The laptop side of pgttt: the HTTP client, sweeps, reports and paired comparisons.

It talks to a server over HTTP and never imports torch; what it shares with the server is ``pgttt.api``.
"""
