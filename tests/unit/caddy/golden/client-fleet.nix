{
  nix.settings = {
    substituters = [
      "https://harmonia.arsfeld.one?priority=60"
      "https://harmonia.tail1234.ts.net?priority=60"
      "https://cache.nixos.org"
    ];
    trusted-public-keys = [
      "harmonia-raider-1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
      "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
    ];
  };
}
