"""A service split across modules: `orders`, `payments` and `shipping` each declare their
consumers on a Router, and `app` includes the three. Queue names are unique per import, so runs
on a shared broker never meet."""
