# The cache host: harmonia-cache as harmonia-dev.service, its health timer, store retention and
# GC pins. Every value that ends up in a unit or a setting comes from ./lib.nix (pure, tested).
{ config, lib, pkgs, ... }:
let
  hlib = import ./lib.nix;
  cfg = config.services.harmonia-bundle.cache;
  health = config.services.harmonia-bundle.healthcheck;
  retention = config.services.harmonia-bundle.retention;
  inherit (lib) mkOption mkEnableOption mkIf mkMerge types;

  toml = pkgs.formats.toml { };
  settings = hlib.cacheSettings {
    inherit (cfg) address port priority compression zstdLevel storeBackend;
    push = if cfg.push.enable then { inherit (cfg.push) trustedKeys retentionDays maxNarBytes; } else null;
    extra = cfg.settings;
  };
  configFile = toml.generate "harmonia.toml" settings;
  credentials = hlib.signKeyCredentials cfg.signKeyPaths;
  argv = hlib.cacheArgv { inherit (cfg) package; };
in
{
  options.services.harmonia-bundle = {
    cache = {
      enable = mkEnableOption "the harmonia-compatible Nix binary cache (harmonia-cache)";

      package = mkOption {
        type = types.package;
        description = "The harmonia-bundle package (provides harmonia-cache and harmonia-healthcheck).";
      };

      address = mkOption {
        type = types.str;
        default = "[::]";
        description = "Address to listen on; `[::]` takes IPv4 and IPv6.";
      };

      port = mkOption {
        type = types.port;
        default = 5000;
        description = "TCP port of the cache.";
      };

      priority = mkOption {
        type = types.ints.unsigned;
        default = 60;
        description = "Priority advertised in /nix-cache-info (lower is preferred; cache.nixos.org is 40).";
      };

      signKeyPaths = mkOption {
        type = types.listOf (types.strMatching "/.*");
        default = [ ];
        example = lib.literalExpression ''[ config.age.secrets.harmonia-raider-1.path ]'';
        description = ''
          Secret signing keys (files from `harmonia-cache key generate` or
          `nix-store --generate-binary-cache-key`), as strings so that they never enter the store:
          agenix/sops-nix secret paths. Passed to the service as systemd credentials. List two keys
          while rotating: paths are signed by both, clients trust either.
        '';
      };

      compression = mkOption {
        type = types.enum [ "zstd" "none" ];
        default = "zstd";
        description = "Compress NARs with zstd for clients that ask for it (Accept-Encoding).";
      };

      zstdLevel = mkOption {
        type = types.nullOr (types.ints.between 1 22);
        default = null;
        description = "zstd level; null keeps the server's default.";
      };

      storeBackend = mkOption {
        type = types.enum [ "daemon" "db" ];
        default = "daemon";
        description = ''
          How the cache reads the store: "daemon" through nix-daemon's socket (works for the
          service's dynamic user), or "db" straight from /nix/var/nix/db (faster, but Nix's
          WAL-mode database cannot be opened reliably by a user without write access to it).
        '';
      };

      push = {
        enable = mkEnableOption "pushes with `nix copy --to http(s)://<cache>/push` (docs/push.md)";
        trustedKeys = mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [ "ci-builders-1:base64…" ];
          description = ''
            The pushers' public keys: a pushed narinfo needs a Sig by one of them. They are added
            to nix.settings.trusted-public-keys too, since the nix-daemon checks them again when it
            imports a path for the cache's (untrusted) user.
          '';
        };
        retentionDays = mkOption {
          type = types.number;
          default = 30;
          description = "Pushed paths stay GC roots this long after their last push.";
        };
        maxNarBytes = mkOption {
          type = types.nullOr types.ints.positive;
          default = null;
          description = "Largest NAR accepted (413 before the body); null keeps the server's default (8 GiB).";
        };
      };

      settings = mkOption {
        type = toml.type;
        default = { };
        example = { workers = 4; };
        description = "Extra harmonia-cache settings (harmonia's TOML keys); they win over the options above.";
      };

      socketActivation = mkOption {
        type = types.bool;
        default = false;
        description = "Let systemd own the port (harmonia-dev.socket): connections queue across restarts.";
      };

      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = "Open the port in the firewall (not needed when only the tailnet sidecar reaches it).";
      };

      watchdogSec = mkOption {
        type = types.ints.positive;
        default = 30;
        description = "systemd watchdog interval; the server pings at half of it.";
      };

      pinnedPaths = mkOption {
        type = types.listOf (types.either types.str types.package);
        default = [ ];
        example = lib.literalExpression "[ self.nixosConfigurations.web.config.system.build.toplevel ]";
        description = ''
          Store paths kept alive as GC roots under /nix/var/nix/gcroots/harmonia (the same roots
          `harmonia-cache pin` makes), e.g. other hosts' systems. Not this host's own toplevel:
          it depends on these rules (infinite recursion). Removing a path here does not remove
          its root: run `harmonia-cache unpin PATH`.
        '';
      };

      configFile = mkOption {
        type = types.path;
        readOnly = true;
        description = "The generated settings file (read only).";
      };
    };

    healthcheck = {
      enable = mkOption {
        type = types.bool;
        default = cfg.enable;
        defaultText = lib.literalExpression "config.services.harmonia-bundle.cache.enable";
        description = "Probe the cache periodically (harmonia-healthcheck.timer).";
      };
      url = mkOption {
        type = types.str;
        default = hlib.healthcheckUrl { inherit (cfg) port; };
        defaultText = "http://127.0.0.1:<port>/nix-cache-info";
        description = "What the probe fetches.";
      };
      interval = mkOption {
        type = types.str;
        default = "1min";
        description = "Time between probes (systemd time span).";
      };
    };

    retention = {
      enable = mkOption {
        type = types.bool;
        default = cfg.enable;
        defaultText = lib.literalExpression "config.services.harmonia-bundle.cache.enable";
        description = "Apply the cache host's store retention settings to nix.settings.";
      };
      keepOutputs = mkOption {
        type = types.bool;
        default = true;
        description = "keep-outputs: GC keeps the outputs of live derivations.";
      };
      keepDerivations = mkOption {
        type = types.bool;
        default = true;
        description = "keep-derivations: GC keeps the derivations of live outputs.";
      };
      minFree = mkOption {
        type = types.nullOr types.ints.unsigned;
        default = 10 * 1024 * 1024 * 1024;
        description = "min-free: collect garbage during builds when free space falls below this (bytes).";
      };
      maxFree = mkOption {
        type = types.nullOr types.ints.unsigned;
        default = 50 * 1024 * 1024 * 1024;
        description = "max-free: stop collecting once this much is free (bytes).";
      };
    };
  };

  config = mkMerge [
    { services.harmonia-bundle.cache.configFile = configFile; }

    (mkIf cfg.enable {
      assertions = [
        {
          assertion = cfg.signKeyPaths != [ ];
          message = "services.harmonia-bundle.cache.signKeyPaths: give at least one signing key; clients require signatures.";
        }
      ];

      environment.systemPackages = [ cfg.package ]; # harmonia-cache pin|unpin|pins, key generate, push-token

      # the daemon imports pushed paths for the cache's untrusted user only when it trusts their Sig
      nix.settings.trusted-public-keys = mkIf cfg.push.enable cfg.push.trustedKeys;

      # With store_backend = "daemon" the service user talks to nix-daemon: if the fleet narrows
      # nix.settings.allowed-users (default "*"), add "harmonia" there.

      systemd.services.harmonia-dev = {
        description = "Nix binary cache (harmonia-cache)";
        wantedBy = [ "multi-user.target" ];
        after = [ "network.target" "nix-daemon.socket" ];
        wants = [ "nix-daemon.socket" ];
        environment = hlib.cacheEnvironment { configFile = "${configFile}"; inherit credentials; };
        serviceConfig = hlib.cacheServiceConfig { inherit argv credentials; inherit (cfg) watchdogSec; };
      };

      systemd.sockets.harmonia-dev = mkIf cfg.socketActivation {
        description = "Nix binary cache socket (harmonia-cache)";
        wantedBy = [ "sockets.target" ];
        listenStreams = [ (hlib.bindAddress { inherit (cfg) address port; }) ];
        socketConfig = {
          BindIPv6Only = "both";
          Backlog = 1024;
          NoDelay = true;
        };
      };

      networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall [ cfg.port ];

      systemd.tmpfiles.rules = hlib.pinRules { paths = map toString cfg.pinnedPaths; };
    })

    (mkIf health.enable {
      systemd.services.harmonia-healthcheck = {
        description = "Health probe of the Nix binary cache (harmonia-dev)";
        after = [ "harmonia-dev.service" ];
        serviceConfig = hlib.healthcheckServiceConfig {
          argv = hlib.healthcheckArgv { inherit (cfg) package; inherit (health) url; };
        };
      };
      systemd.timers.harmonia-healthcheck = {
        description = "Periodic health probe of the Nix binary cache (harmonia-dev)";
        wantedBy = [ "timers.target" ];
        timerConfig = hlib.healthcheckTimerConfig { inherit (health) interval; };
      };
    })

    (mkIf retention.enable {
      nix.settings = hlib.retentionSettings {
        inherit (retention) keepOutputs keepDerivations minFree maxFree;
      };
    })
  ];
}
