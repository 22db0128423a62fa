"""Push: `nix copy --to http(s)://cache/push`, imported into the host store through the nix-daemon.

Pure parts (config, tokens, the uploaded narinfo, NAR bodies, retention) live beside the routes
(`cache/routes/push.py`) that tie them together.
"""
