"""What operators look at: the HTTP server and its endpoints (http.py, http_server.py),
Prometheus metrics, the status document and page (status.py, web/), and sd_notify.
"""
