from tests.tailnet.fixtures import netns_module, require_real_nodes, tailnet_netns  # noqa: F401
