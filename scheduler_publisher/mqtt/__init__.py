"""The wire: one epoll loop (netloop.py) driving every connection's state machine
(session.py) and paho client (client.py), pre-encoded packets (packet.py), the file
descriptors the lwt connections may take (descriptors.py), and the routing
of entries to connections with wills and quarantine (connection.py, faults.py). Never
imports scheduling/.
"""
