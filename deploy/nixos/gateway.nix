# The public gateway: `harmonia-caddy gateway …` renders the Caddy snippet at build time into
# /etc/harmonia/gateway.caddy; services.caddy imports it when addToCaddy is set.
{ config, lib, pkgs, ... }:
let
  hlib = import ./lib.nix;
  cfg = config.services.harmonia-bundle.gateway;
  inherit (lib) mkOption mkEnableOption mkIf types;

  argv = hlib.gatewayArgv {
    inherit (cfg) package site upstreams viaTailnet expose maxBody maxPushBody allowUpload tls bind snippetName
      logOutput accessLog compress extraArgs;
  };
  snippet = pkgs.runCommand "harmonia-gateway.caddy" { } ''
    ${lib.escapeShellArgs argv} > $out
  '';
in
{
  options.services.harmonia-bundle.gateway = {
    enable = mkEnableOption "the Caddy gateway snippet for the public name of the cache";
    package = mkOption {
      type = types.package;
      default = config.services.harmonia-bundle.cache.package;
      defaultText = lib.literalExpression "config.services.harmonia-bundle.cache.package";
      description = "The harmonia-bundle package (provides harmonia-caddy).";
    };
    site = mkOption {
      type = types.str;
      example = "cache.example.org";
      description = "The public site address Caddy serves.";
    };
    upstreams = mkOption {
      type = types.listOf types.str;
      example = [ "http://harmonia.tail1234.ts.net" ];
      description = "Where the cache is reached, in order of preference.";
    };
    viaTailnet = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "Dial the upstreams through this caddy-tailscale node (Caddy needs the plugin).";
    };
    expose = mkOption {
      type = types.listOf (types.enum [ "serve" "log" "metrics" "push" ]);
      default = [ ];
      description = "Also expose /serve/…, /log/…, /metrics or the cache's push routes /push/… publicly.";
    };
    maxPushBody = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "64GiB";
      description = "With expose = [ \"push\" ]: the body limit of a push (a NAR upload); the renderer's default (64GiB) when null.";
    };
    maxBody = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "1MiB";
      description = "Request body limit (the renderer's default when null; \"none\" for no limit).";
    };
    allowUpload = mkOption {
      type = types.bool;
      default = false;
      description = "Allow methods other than GET and HEAD (nix copy --to).";
    };
    tls = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "null (automatic HTTPS), \"internal\", or an ACME e-mail address.";
    };
    bind = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "Interface addresses the site listens on (all when empty).";
    };
    snippetName = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "Name of the rendered (snippet); the renderer's default when null.";
    };
    logOutput = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "Access log output: stdout, stderr or a file path (Caddy's default when null).";
    };
    accessLog = mkOption {
      type = types.bool;
      default = true;
      description = "Log requests.";
    };
    compress = mkOption {
      type = types.bool;
      default = true;
      description = "Compress narinfo, nix-cache-info and .ls responses.";
    };
    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "Extra arguments for `harmonia-caddy gateway`.";
    };
    addToCaddy = mkOption {
      type = types.bool;
      default = false;
      description = "Import the snippet into services.caddy's Caddyfile.";
    };
    snippet = mkOption {
      type = types.path;
      readOnly = true;
      description = "The rendered snippet (read only).";
    };
  };

  config = mkIf cfg.enable {
    services.harmonia-bundle.gateway.snippet = snippet;
    environment.etc."harmonia/gateway.caddy".source = snippet;
    services.caddy.extraConfig = mkIf cfg.addToCaddy ''
      import ${snippet}
    '';
  };
}
