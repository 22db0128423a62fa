from tests.tailnet.fixtures import acme_tailnet, netns_module, require_real_nodes, tailnet_netns  # noqa: F401
