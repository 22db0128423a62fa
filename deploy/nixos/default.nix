# The harmonia-bundle NixOS modules. Import this file on every host: the client part is enabled
# with services.harmonia-bundle.client.enable, the cache host's parts with
# services.harmonia-bundle.{cache,sidecar.services,gateway}. See docs/deploy.md.
{
  imports = [
    ./cache.nix
    ./sidecar.nix
    ./gateway.nix
    ./client.nix
  ];
}
