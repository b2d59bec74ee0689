"""``bangui-geo agent``: follows fail2ban's own SQLite database and publishes its bans as
``ip.seen``, keeping a confirmed position so that no ban is lost across outages and restarts."""
