// A real OpenID Connect provider (panva's oidc-provider) for the gateway's sign-in tests.
//   node tests/oidc/provider.mjs CONFIG.json
// CONFIG: {issuer, port, jwks: {keys: [private JWKs]}, clients: [...], accounts: {id: {email, groups}},
//          resource, accessTokenTtl, clientGroups: {client_id: [groups]}}
// Sign-in uses the library's development login form (any password); consent is given at once.
import fs from 'node:fs';
import Provider from 'oidc-provider';

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));

const configuration = {
  clients: cfg.clients,
  jwks: cfg.jwks,
  cookies: { keys: ['test-cookie-key-0123456789'] },
  claims: { openid: ['sub'], email: ['email'], groups: ['groups'] },
  scopes: ['openid', 'email', 'groups', 'profile'],
  conformIdTokenClaims: false, // the groups go into the ID token itself
  pkce: { required: () => true },
  async findAccount(ctx, id) {
    const account = cfg.accounts[id];
    if (!account) return undefined;
    return { accountId: id, async claims() { return { sub: id, email: account.email, groups: account.groups }; } };
  },
  features: {
    devInteractions: { enabled: true },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => cfg.resource,
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({
        scope: 'admin',
        audience: cfg.resource,
        accessTokenFormat: 'jwt',
        accessTokenTTL: cfg.accessTokenTtl,
        jwt: { sign: { alg: cfg.jwks.keys[0].alg || 'RS256' } },
      }),
    },
  },
  async extraTokenClaims(ctx, token) {
    if (token.accountId && cfg.accounts[token.accountId]) return { groups: cfg.accounts[token.accountId].groups };
    if (token.clientId && cfg.clientGroups[token.clientId]) return { groups: cfg.clientGroups[token.clientId] };
    return undefined;
  },
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({ clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId });
    grant.addOIDCScope('openid email groups profile');
    grant.addOIDCClaims(['email', 'groups']);
    grant.addResourceScope(cfg.resource, 'admin');
    await grant.save();
    return grant;
  },
};

const provider = new Provider(cfg.issuer, configuration);
provider.listen(cfg.port, '127.0.0.1', () => console.log(`oidc-provider listening on ${cfg.issuer}`));
