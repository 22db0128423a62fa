# Pure functions behind the harmonia-bundle NixOS modules: option values in; argv, settings and
# systemd unit attributes out. Only builtins are used (no nixpkgs lib), so the tests evaluate every
# function here with plain `nix-instantiate --eval --strict --json`, and the modules stay thin.
#
# The unit attributes (cacheServiceConfig, healthcheckServiceConfig, sidecarServiceConfig) are the
# same settings as the shipped units in deploy/systemd/; a test compares them key by key.
let
  inherit (builtins)
    all any attrNames concatLists concatMap concatStringsSep elem filter foldl' genList
    isBool isInt isList isString length listToAttrs match replaceStrings stringLength
    substring throw toJSON;

  # --- small helpers ---------------------------------------------------------------------------

  optional = cond: xs: if cond then xs else [ ];
  flag = name: enabled: optional enabled [ name ];
  valueFlag = name: v: optional (v != null) [ name (toString v) ];
  repeatedFlag = name: vs: concatMap (v: [ name (toString v) ]) vs;
  # a duration as the sidecar's flags take it: an integer is seconds, a string is passed on
  # ("500ms", "1m"); floats are refused because Nix prints them as 1.500000
  seconds = v:
    if v == null || isString v then v
    else check (isInt v) "durations are integers (seconds) or strings like \"500ms\"" "${toString v}s";
  dropNulls = attrs: listToAttrs (concatMap
    (n: optional (attrs.${n} != null) [ { name = n; value = attrs.${n}; } ])
    (attrNames attrs));

  check = cond: message: value: if cond then value else throw "harmonia-bundle: ${message}";

  isNonEmptyString = s: isString s && s != "";
  isAbsolute = p: isString p && substring 0 1 p == "/";

  # --- quoting for systemd command lines (ExecStart=) -------------------------------------------

  # A word is written bare when it is made of these characters only; otherwise it is put in
  # double quotes with `\` and `"` escaped. `%` is doubled (systemd specifiers) and `$` too
  # (systemd's variable expansion) unless `keepSpecifiers` is set, for words like "%d/authkey".
  safeWord = w: match "[A-Za-z0-9_./:=@+,-]+" w != null;
  escapeWord = keepSpecifiers: w:
    let
      w' = if keepSpecifiers then w else replaceStrings [ "%" "$" ] [ "%%" "$$" ] w;
    in
    if w != "" && safeWord w then w
    else if w != "" && keepSpecifiers && match "[A-Za-z0-9_./:=@+,%-]+" w != null then w
    else "\"" + replaceStrings [ "\\" "\"" ] [ "\\\\" "\\\"" ] w' + "\"";

  # argv -> ExecStart= value. Words starting with "%d/", "%S/" or "%i" keep their specifiers.
  execLine = argv:
    let
      keeps = w: match "(%d/|%S/|%i|%t/).*" w != null;
    in
    concatStringsSep " " (map (w: escapeWord (keeps w) w) (
      check (isList argv && argv != [ ] && all isString argv) "argv must be a non-empty list of strings"
        (check (isAbsolute (builtins.head argv)) "the program must be an absolute path (got ${toJSON (builtins.head argv)})" argv)));

  # --- the cache --------------------------------------------------------------------------------

  # "[::]" + 5000 -> "[::]:5000"; a bare IPv6 address gets its brackets.
  bindAddress = { address, port }:
    let
      host = if match ".*:.*" address != null && match "\\[.*]" address == null
        then "[${address}]" else address;
    in
    check (isInt port && port > 0 && port < 65536) "port must be 1-65535 (got ${toJSON port})"
      "${host}:${toString port}";

  # The TOML settings of harmonia-cache (harmonia's keys). `extra` wins over the generated keys.
  # storeBackend "daemon": the service's dynamic user cannot read Nix's WAL-mode database
  # reliably (see deploy/systemd/harmonia.toml), so it asks nix-daemon.
  # push: null (off) or { trustedKeys; retentionDays ? 30; maxNarBytes ? null; } -> [push] (docs/push.md).
  cacheSettings = { address ? "[::]", port ? 5000, priority ? 60, compression ? "zstd"
                  , zstdLevel ? null, storeBackend ? "daemon", push ? null, extra ? { } }:
    check (elem compression [ "zstd" "none" ]) "compression must be \"zstd\" or \"none\" (got ${toJSON compression})"
      (check (isInt priority && priority >= 0) "priority must be a non-negative integer"
        (check (elem storeBackend [ "daemon" "db" ]) "storeBackend must be \"daemon\" or \"db\" (got ${toJSON storeBackend})"
          ({
            bind = bindAddress { inherit address port; };
            inherit priority;
            enable_compression = compression == "zstd";
            store_backend = storeBackend;
          } // (if compression == "zstd" && zstdLevel != null then { zstd = { level = zstdLevel; }; } else { })
            // (if push == null then { } else { push = pushSettings push; })
            // extra)));

  pushSettings = { trustedKeys, retentionDays ? 30, maxNarBytes ? null }:
    check (isList trustedKeys && trustedKeys != [ ] && all isString trustedKeys)
      "push.trustedKeys: list the pushers' public keys (name:base64); they must also be in nix.settings.trusted-public-keys"
      ({ enable = true; trusted_keys = trustedKeys; retention_days = retentionDays; }
        // (if maxNarBytes == null then { } else { max_nar_bytes = maxNarBytes; }));

  # Signing keys reach the service as systemd credentials: file -> credential name.
  # Names are sign-key-0, sign-key-1, … in the order given (the first one signs first).
  signKeyCredentials = paths:
    check (isList paths) "signKeyPaths must be a list"
      (genList (i:
        let p = toString (builtins.elemAt paths i); in
        check (isAbsolute p) "sign key path ${toJSON p} must be absolute (an agenix secret's .path)"
          { name = "sign-key-${toString i}"; path = p; })
        (length paths));

  # What the unit's Environment= carries: the settings file and the credentials' paths.
  cacheEnvironment = { configFile, credentials }:
    {
      CONFIG_FILE = check (isAbsolute (toString configFile)) "configFile must be absolute" (toString configFile);
    } // (if credentials == [ ] then { } else {
      SIGN_KEY_PATHS = concatStringsSep " " (map (c: "%d/${c.name}") credentials);
    });

  cacheArgv = { package }: [ "${package}/bin/harmonia-cache" ];

  # Settings shared by the cache and the probe: nothing to write, nothing to gain.
  hardening = {
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    NoNewPrivileges = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectProc = "invisible";
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    CapabilityBoundingSet = "";
    SystemCallArchitectures = "native";
    SystemCallFilter = [ "@system-service" "~@privileged @resources" ];
  };

  cacheServiceConfig = { argv, credentials ? [ ], watchdogSec ? 30 }:
    hardening // {
      Type = "notify";
      NotifyAccess = "main";
      ExecStart = execLine argv;
      LoadCredential = map (c: "${c.name}:${c.path}") credentials;
      WatchdogSec = "${toString watchdogSec}s";
      Restart = "on-failure";
      RestartSec = "2s";
      TimeoutStartSec = "60s";
      TimeoutStopSec = "30s";
      LimitNOFILE = 65536;
      DynamicUser = true;
      User = "harmonia";
      Group = "harmonia";
      StateDirectory = "harmonia";
      StateDirectoryMode = "0750";
      WorkingDirectory = "%S/harmonia";
      UMask = "0077";
      ReadOnlyPaths = [ "/nix/store" "-/nix/var/nix/db" "-/nix/var/nix/daemon-socket" ];
      DevicePolicy = "closed";
      ProtectHostname = true;
      ProtectClock = true;
      ProcSubset = "pid";
      RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
      RemoveIPC = true;
      AmbientCapabilities = "";
      SystemCallErrorNumber = "EPERM";
    };

  # --- the health probe -------------------------------------------------------------------------

  healthcheckUrl = { port ? 5000 }: "http://127.0.0.1:${toString port}/nix-cache-info";

  healthcheckArgv = { package, url }:
    check (match "https?://.+" url != null) "healthcheck url must be http(s)://… (got ${toJSON url})"
      [ "${package}/bin/harmonia-healthcheck" url ];

  healthcheckServiceConfig = { argv }:
    hardening // {
      Type = "oneshot";
      ExecStart = execLine argv;
      TimeoutStartSec = "30s";
      DynamicUser = true;
      ProcSubset = "pid";
      RestrictAddressFamilies = [ "AF_INET" "AF_INET6" ];
    };

  healthcheckTimerConfig = { interval ? "1min", onBoot ? "1min" }: {
    OnBootSec = onBoot;
    OnUnitActiveSec = interval;
    AccuracySec = "5s";
    Unit = "harmonia-healthcheck.service";
  };

  # --- the sidecar: one service -> one tsnsrv-like command line ---------------------------------

  # `service` holds the sidecar options of one published service (see sidecar.nix); `name` is
  # the node's name on the tailnet. The auth key is read from a file (the unit passes its
  # credential), never from the command line.
  sidecarArgv = { package, name, service }:
    let
      s = {
        upstream = null; upstreamUnixAddr = null; ephemeral = false; tags = [ ];
        authKeyPath = null; listenAddr = null; plaintext = false; certificateFile = null;
        keyFile = null; prefixes = [ ]; stripPrefix = true;
        upstreamHeaders = { }; insecureHTTPS = false; whoisTimeout = null; suppressWhois = false;
        readHeaderTimeout = null; timeout = null; prometheusAddr = null; pushAllow = [ ]; extraArgs = [ ];
      } // service;
      headerNames = attrNames s.upstreamHeaders;
    in
    check (match "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?" name != null)
      "sidecar service name ${toJSON name} is not a tailnet host name (a-z, 0-9, '-', at most 63)"
      (check (isNonEmptyString s.upstream) "sidecar service ${name}: upstream is required"
        (check (!(service ? funnel || service ? funnelOnly))
          "sidecar service ${name}: Funnel is not available with the sidecar's caddy-tailscale engine"
          (check (all (t: match "tag:[A-Za-z0-9][A-Za-z0-9_-]*" t != null) s.tags)
            "sidecar service ${name}: tags must look like tag:name (got ${toJSON s.tags})"
            (check ((s.certificateFile == null) == (s.keyFile == null))
              "sidecar service ${name}: certificateFile and keyFile go together"
              (concatLists [
                [ "${package}/bin/harmonia-sidecar" "--name" name ]
                (flag "--ephemeral" s.ephemeral)
                (repeatedFlag "--tag" s.tags)
                (valueFlag "--authkey-path" s.authKeyPath)
                (valueFlag "--listen-addr" s.listenAddr)
                (flag "--plaintext" s.plaintext)
                (valueFlag "--certificate-file" s.certificateFile)
                (valueFlag "--key-file" s.keyFile)
                (repeatedFlag "--prefix" s.prefixes)
                (optional (!s.stripPrefix) [ "--no-strip-prefix" ])
                (concatMap (h: [ "--upstream-header" "${h}: ${s.upstreamHeaders.${h}}" ]) headerNames)
                (flag "--insecure-https" s.insecureHTTPS)
                (valueFlag "--whois-timeout" (seconds s.whoisTimeout))
                (flag "--suppress-whois" s.suppressWhois)
                (repeatedFlag "--push-allow" s.pushAllow)
                (valueFlag "--read-header-timeout" (seconds s.readHeaderTimeout))
                (valueFlag "--timeout" (seconds s.timeout))
                (valueFlag "--prometheus-addr" s.prometheusAddr)
                (valueFlag "--upstream-unix-addr" s.upstreamUnixAddr)
                s.extraArgs
                [ s.upstream ]
              ])))));

  # The node's state and the engine's (Caddy autosaves under $XDG_CONFIG_HOME) stay in one
  # private directory per service.
  sidecarEnvironment = { stateDir, controlUrl ? null }:
    {
      TS_STATE_DIR = stateDir;
      HOME = stateDir;
      XDG_CONFIG_HOME = "${stateDir}/config";
      XDG_DATA_HOME = "${stateDir}/data";
    } // (if controlUrl == null then { } else { TS_URL = controlUrl; });

  sidecarServiceConfig = { argv, stateDirectory, authKeyFile ? null }:
    hardening // {
      Type = "simple";
      ExecStart = execLine argv;
      LoadCredential = optional (authKeyFile != null) [ "authkey:${toString authKeyFile}" ];
      Restart = "on-failure";
      RestartSec = "5s";
      # a stop takes under a second (docs/sidecar.md), at most the engine's 10 s kill deadline
      TimeoutStopSec = "30s";
      DynamicUser = true;
      StateDirectory = stateDirectory;
      StateDirectoryMode = "0700";
      WorkingDirectory = "%S/${stateDirectory}";
      UMask = "0077";
      ProtectHostname = true;
      ProtectClock = true;
      RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" "AF_NETLINK" ];
      RemoveIPC = true;
      AmbientCapabilities = "";
      SystemCallErrorNumber = "EPERM";
    };

  # --- the gateway snippet ----------------------------------------------------------------------

  # options -> `harmonia-caddy gateway …`, whose output is the snippet (and a site importing it)
  gatewayArgv = { package, site, upstreams, viaTailnet ? null, expose ? [ ], maxBody ? null
                , maxPushBody ? null, allowUpload ? false, tls ? null, bind ? [ ], snippetName ? null
                , logOutput ? null, accessLog ? true, compress ? true, extraArgs ? [ ] }:
    check (isNonEmptyString site) "gateway site is required (e.g. cache.example.org)"
      (check (upstreams != [ ]) "gateway needs at least one upstream"
        (check (all (e: elem e [ "serve" "log" "metrics" "push" ]) expose)
          "gateway expose takes serve, log, metrics and push (got ${toJSON expose})"
          (concatLists [
            [ "${package}/bin/harmonia-caddy" "gateway" "--site" site ]
            (repeatedFlag "--upstream" upstreams)
            (valueFlag "--via-tailnet" viaTailnet)
            (repeatedFlag "--expose" expose)
            (valueFlag "--max-body" maxBody)
            (valueFlag "--max-push-body" maxPushBody)
            (flag "--allow-upload" allowUpload)
            (valueFlag "--tls" tls)
            (repeatedFlag "--bind" bind)
            (valueFlag "--snippet-name" snippetName)
            (valueFlag "--log-output" logOutput)
            (flag "--no-access-log" (!accessLog))
            (flag "--no-compress" (!compress))
            extraArgs
          ])));

  # --- every host: the client side --------------------------------------------------------------

  isPublicKey = k: match "[A-Za-z0-9._-]+:[A-Za-z0-9+/]{43}=" k != null;

  # nix.settings for a host that substitutes from the cache; the priority goes into the URL
  # as `harmonia-caddy client` writes it (cache.nixos.org stays NixOS's own default).
  clientSettings = { url, publicKeys, priority ? 60 }:
    check (match "https?://[^ ?]+" url != null) "client url must be http(s)://… without a query (got ${toJSON url})"
      (check (publicKeys != [ ] && all isPublicKey publicKeys)
        "client publicKeys must be name:base64 ed25519 keys (got ${toJSON publicKeys})"
        (check (priority == null || isInt priority) "client priority must be an integer or null"
          {
            substituters = [ (if priority == null then url else "${url}?priority=${toString priority}") ];
            trusted-public-keys = publicKeys;
          }));

  # --- store retention on the cache host ------------------------------------------------------

  retentionSettings = { keepOutputs ? true, keepDerivations ? true, minFree ? null, maxFree ? null }:
    check (minFree == null || maxFree == null || minFree < maxFree) "retention: minFree must be below maxFree"
      (dropNulls {
        keep-outputs = keepOutputs;
        keep-derivations = keepDerivations;
        min-free = minFree;
        max-free = maxFree;
      });

  # --- GC pins: the same roots `harmonia-cache pin` makes --------------------------------------

  # Nix's base-32 digits leave out e, o, u and t.
  isStorePath = p: match "/nix/store/[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+._?=-]+" p != null
    && match "/nix/store/[^/]*-[.].*" p == null;

  pinRules = { gcrootsDir ? "/nix/var/nix/gcroots/harmonia", paths }:
    map (p:
      let p' = toString p; in
      check (isStorePath p') "pinned path ${toJSON p'} is not a store path"
        "L+ ${gcrootsDir}/${baseNameOf p'} - - - - ${p'}")
      paths;
in
{
  inherit
    execLine bindAddress cacheSettings signKeyCredentials cacheEnvironment cacheArgv
    cacheServiceConfig healthcheckUrl healthcheckArgv healthcheckServiceConfig healthcheckTimerConfig
    sidecarArgv sidecarEnvironment sidecarServiceConfig gatewayArgv clientSettings isPublicKey
    retentionSettings pinRules isStorePath;
}
