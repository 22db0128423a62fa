# harmonia-sidecar: each entry of services.harmonia-bundle.sidecar.services becomes its own tailnet
# node (like tsnsrv's services.tsnsrv.services) and its own unit, harmonia-sidecar-<name>.service,
# with a private state directory /var/lib/harmonia-sidecar/<name>.
{ config, lib, ... }:
let
  hlib = import ./lib.nix;
  cfg = config.services.harmonia-bundle.sidecar;
  inherit (lib) mkOption mkIf types mapAttrs' nameValuePair;

  serviceOptions = { name, ... }: {
    options = {
      name = mkOption {
        type = types.str;
        default = name;
        description = "The node's name on the tailnet (defaults to the attribute name).";
      };
      upstream = mkOption {
        type = types.str;
        example = "http://127.0.0.1:5000";
        description = "URL of the local service to publish.";
      };
      upstreamUnixAddr = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "Dial this unix socket instead of the upstream URL's host.";
      };
      authKeyPath = mkOption {
        type = types.nullOr (types.strMatching "/.*");
        default = cfg.defaults.authKeyPath;
        defaultText = lib.literalExpression "config.services.harmonia-bundle.sidecar.defaults.authKeyPath";
        description = "File with the auth key or tskey-client-… secret (an agenix/sops secret path).";
      };
      controlUrl = mkOption {
        type = types.nullOr types.str;
        default = cfg.defaults.controlUrl;
        defaultText = lib.literalExpression "config.services.harmonia-bundle.sidecar.defaults.controlUrl";
        description = "Coordination server (TS_URL), e.g. a headscale URL; null for Tailscale's.";
      };
      ephemeral = mkOption {
        type = types.bool;
        default = cfg.defaults.ephemeral;
        description = "Register as an ephemeral node.";
      };
      tags = mkOption {
        type = types.listOf types.str;
        default = cfg.defaults.tags;
        example = [ "tag:harmonia" ];
        description = "ACL tags to advertise (required for tskey-client- secrets).";
      };
      listenAddr = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = ":443";
        description = "Address on the node to listen on (the sidecar's default when null).";
      };
      plaintext = mkOption {
        type = types.bool;
        default = false;
        description = "Serve plain HTTP on the tailnet instead of TLS.";
      };
      certificateFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "A custom TLS certificate (with keyFile) instead of the tailnet's.";
      };
      keyFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "Key of certificateFile.";
      };
      prefixes = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "/nix-cache-info" "/nar/" ];
        description = "Path prefixes to serve (others get 404).";
      };
      stripPrefix = mkOption {
        type = types.bool;
        default = true;
        description = "Remove the matched prefix before proxying.";
      };
      upstreamHeaders = mkOption {
        type = types.attrsOf types.str;
        default = { };
        description = "Headers added to every proxied request.";
      };
      insecureHTTPS = mkOption {
        type = types.bool;
        default = false;
        description = "Do not verify an https upstream's certificate.";
      };
      whoisTimeout = mkOption {
        type = types.nullOr (types.either types.ints.positive types.str);
        default = null;
        description = "How long to wait for the peer's identity (seconds, or a string like \"500ms\").";
      };
      suppressWhois = mkOption {
        type = types.bool;
        default = false;
        description = "Do not look up or forward the peer's identity.";
      };
      pushAllow = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "tag:ci" "alice@example.com" ];
        description = "Only these callers may use /push (tags need the sidecar's whois directory); empty: every caller.";
      };
      readHeaderTimeout = mkOption {
        type = types.nullOr (types.either types.ints.positive types.str);
        default = null;
        description = "Limit for reading request headers.";
      };
      timeout = mkOption {
        type = types.nullOr (types.either types.ints.positive types.str);
        default = null;
        description = "Start-up timeout of the node.";
      };
      prometheusAddr = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "Serve metrics on this address.";
      };
      extraArgs = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Extra command-line arguments.";
      };
    };
  };

  unitFor = name: svc:
    let
      stateDirectory = "harmonia-sidecar/${name}";
      argv = hlib.sidecarArgv {
        inherit (cfg) package;
        inherit (svc) name;
        service = removeAttrs svc [ "name" "controlUrl" "authKeyPath" ] // {
          authKeyPath = if svc.authKeyPath == null then null else "%d/authkey";
        };
      };
    in
    nameValuePair "harmonia-sidecar-${name}" {
      description = "Tailnet sidecar for ${svc.name} (harmonia-sidecar)";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ];
      environment = hlib.sidecarEnvironment {
        stateDir = "%S/${stateDirectory}";
        inherit (svc) controlUrl;
      };
      serviceConfig = hlib.sidecarServiceConfig {
        inherit argv stateDirectory;
        authKeyFile = svc.authKeyPath;
      };
    };
in
{
  options.services.harmonia-bundle.sidecar = {
    package = mkOption {
      type = types.package;
      default = config.services.harmonia-bundle.cache.package;
      defaultText = lib.literalExpression "config.services.harmonia-bundle.cache.package";
      description = "The harmonia-bundle package (provides harmonia-sidecar).";
    };
    defaults = {
      authKeyPath = mkOption {
        type = types.nullOr (types.strMatching "/.*");
        default = null;
        description = "Default auth key file for every service.";
      };
      controlUrl = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "Default coordination server URL (TS_URL).";
      };
      ephemeral = mkOption {
        type = types.bool;
        default = false;
        description = "Default for ephemeral.";
      };
      tags = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Default ACL tags.";
      };
    };
    services = mkOption {
      type = types.attrsOf (types.submodule serviceOptions);
      default = { };
      example = lib.literalExpression ''
        { harmonia = { upstream = "http://127.0.0.1:5000"; tags = [ "tag:harmonia" ]; }; }
      '';
      description = ''
        Services to publish on the tailnet, one node each. tsnsrv's funnel options are absent:
        the sidecar's engine (caddy-tailscale) cannot open Funnel listeners.
      '';
    };
  };

  config = mkIf (cfg.services != { }) {
    systemd.services = mapAttrs' unitFor cfg.services;
  };
}
