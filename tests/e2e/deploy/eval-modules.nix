# Evaluate deploy/nixos with nixpkgs' real module system (`lib.evalModules`), without NixOS.
#
# `lib` is a real nixpkgs lib directory (see test_deploy_nixos_modules.py). What is *not* real here:
# the declarations of the NixOS options our modules write into (systemd.*, nix.settings, …) are
# loose stand-ins (attribute sets of anything), and `pkgs` has only the two functions the modules
# call. So this checks our own option declarations, their types and defaults, the module
# structure (mkIf/mkMerge), and the values the modules produce, but not that NixOS accepts them.
{ libPath, configuration }:
let
  lib = import libPath;
  inherit (lib) mkOption types;
  loose = mkOption { type = types.attrsOf types.anything; default = { }; };
  units = mkOption {
    type = types.attrsOf (types.submodule { freeformType = types.attrsOf types.anything; });
    default = { };
  };
  nixosStandIns = {
    options = {
      assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };
      environment.etc = mkOption {
        type = types.attrsOf (types.submodule { options.source = mkOption { type = types.path; }; });
        default = { };
      };
      # as NixOS's nix.settings: lists (substituters, trusted-public-keys) from several modules concatenate
      nix.settings = mkOption {
        type = types.attrsOf (types.either (types.listOf types.str) types.anything);
        default = { };
      };
      systemd.services = units;
      systemd.sockets = units;
      systemd.timers = units;
      systemd.tmpfiles.rules = mkOption { type = types.listOf types.str; default = [ ]; };
      networking.firewall.allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
      services.caddy.extraConfig = mkOption { type = types.lines; default = ""; };
    };
  };
  pkgs = {
    formats.toml = { }: {
      type = types.attrsOf types.anything;
      generate = name: value: builtins.toFile name (builtins.toJSON value);
    };
    # the script is kept (not run): a file holding it, its store references dropped
    runCommand = name: env: script: builtins.toFile name (builtins.unsafeDiscardStringContext script);
  };
  # a package value for `package` options: a derivation that is never built
  standInPackage = builtins.derivation {
    name = "harmonia-bundle-stand-in";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "exit 1" ];
  };
  evaluated = lib.evalModules {
    modules = [ nixosStandIns ../../../deploy/nixos configuration ];
    specialArgs = { inherit pkgs standInPackage; };
  };
  inherit (evaluated) config;
  failed = builtins.filter (a: !a.assertion) config.assertions;
in
{
  package = standInPackage.outPath;
  failedAssertions = map (a: a.message) failed;
  services = config.systemd.services;
  sockets = config.systemd.sockets;
  timers = config.systemd.timers;
  nixSettings = config.nix.settings;
  tmpfiles = config.systemd.tmpfiles.rules;
  firewall = config.networking.firewall.allowedTCPPorts;
  etc = builtins.mapAttrs (_: e: toString e.source) config.environment.etc;
  caddyExtraConfig = config.services.caddy.extraConfig;
  cacheSettings = builtins.fromJSON (builtins.readFile config.services.harmonia-bundle.cache.configFile);
  gatewayScript =
    if config.services.harmonia-bundle.gateway.enable
    then builtins.readFile config.services.harmonia-bundle.gateway.snippet else null;
}
