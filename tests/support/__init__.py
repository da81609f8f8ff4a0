"""Real-socket test rig for pyroute: a dnslib DNS server, h11 upstreams, the pyroute runner."""
