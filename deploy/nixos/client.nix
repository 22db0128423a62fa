# Every host of the fleet: substitute from the cache and trust its keys (the fleet's common module).
{ config, lib, ... }:
let
  hlib = import ./lib.nix;
  cfg = config.services.harmonia-bundle.client;
  inherit (lib) mkOption mkEnableOption mkIf types;
in
{
  options.services.harmonia-bundle.client = {
    enable = mkEnableOption "substituting from the fleet's harmonia cache";
    url = mkOption {
      type = types.str;
      default = "http://raider:5000";
      example = "https://cache.example.org";
      description = "The cache's URL (tailnet name, or the gateway's public name).";
    };
    priority = mkOption {
      type = types.nullOr types.ints.unsigned;
      default = 60;
      description = "Substituter priority put in the URL (lower is preferred; cache.nixos.org is 40).";
    };
    publicKeys = mkOption {
      type = types.listOf types.str;
      example = [ "harmonia-raider-1:…" ];
      description = ''
        Public keys whose signatures are trusted (name:base64). During a key rotation list both
        the old and the new key.
      '';
    };
  };

  config = mkIf cfg.enable {
    nix.settings = hlib.clientSettings { inherit (cfg) url publicKeys priority; };
  };
}
