// aoai-fwdproxy: the whole hardened set in one resource group.
//
//   client ─443─▶ Application Gateway (WAF_v2, TLS from Key Vault, rewrite rules, health probe)
//                   └─▶ Function App per AOAI resource (Linux, custom handler `handler`)
//                         └─▶ its AOAI resource, Content Safety, Cosmos DB, Key Vault — all over
//                             private endpoints in the hub network
//
// Build:   az bicep build -f infra/main.bicep
// Check:   az deployment group what-if -g <rg> -f infra/main.bicep -p @infra/main.parameters.json
// Deploy:  az deployment group create -g <rg> -f infra/main.bicep -p @infra/main.parameters.json
//          (the deployment is named after the file, "main", unless -n says otherwise)
// Publish: Flex Consumption (default): cd dist/package && func azure functionapp publish <app> --no-build --custom,
//          or VS Code "Deploy to Function App"; Elastic Premium: infra/publish.sh -g <rg> [-n <deployment-name>]
//          (both: docs/deploy.md)
// Smoke:   infra/smoke.sh --gateway https://<appGatewayFqdn> --key <internal key> ...

targetScope = 'resourceGroup'

// ---------------------------------------------------------------------------------------------
// General
// ---------------------------------------------------------------------------------------------

@description('Region of the gateway, the hub network and the shared services.')
param location string = resourceGroup().location

@description('Short lowercase prefix (letters and digits) for resource names.')
@minLength(3)
@maxLength(12)
param namePrefix string

param tags object = {}

@description('Existing Azure OpenAI resources, one Function App each: [{ name, resourceGroup, subscriptionId?, appLocation? }]. appLocation (default: location) picks the Function App region; apps in one region share one plan.')
@minLength(1)
param aoaiResources array

// ---------------------------------------------------------------------------------------------
// Handler settings (app settings; see README "Settings contract")
// ---------------------------------------------------------------------------------------------

@description('How the handler authenticates to AOAI: managed_identity (keyless, default) or key (the account key, copied into Key Vault by this deployment).')
@allowed([
  'managed_identity'
  'key'
])
param aoaiAuth string = 'managed_identity'

@description('AOAI_INAPIKEY: the internal key callers present. Stored in Key Vault.')
@secure()
param inApiKey string = ''

@description('AOAI_INAPIKEYS: more callers as name:key pairs, comma-separated. Stored in Key Vault.')
@secure()
param inApiKeys string = ''

@allowed([
  'off'
  'present'
  'registered'
])
param userCheck string = 'present'

@description('REGISTERED_USERS: comma-separated names (the Cosmos DB users container adds to them).')
param registeredUsers string = ''

@description('AOAI_TIMEOUT_MS: upstream timeout; must stay under the 230 s Functions front-end limit.')
@minValue(1000)
@maxValue(229000)
param aoaiTimeoutMs int = 220000

@description('AUDIT_LOG_PATH: JSON Lines file for abuse records when Cosmos DB is not deployed; empty leaves it unset.')
param auditLogPath string = ''

@description('Spillover (issue 14): give each Function App the other AOAI resources as backups (AOAI_BACKUPS), in order from the next one after its own, wrapping, so a throttled or failing resource\'s share of the traffic goes to its siblings before the first byte of an answer. Every resource must serve the same deployment names. Keyless (aoaiAuth managed_identity): each app\'s identity also gets Cognitive Services OpenAI User on every sibling. Key mode: each app reads the siblings\' keys from their Key Vault secrets (AOAI_BACKUP_OUTAPIKEY_SECRET_URIS). Needs two or more aoaiResources; off by default.')
param aoaiSpillover bool = false

@description('HEALTH_REFLECTS_CAPACITY: the health route answers 503 while every upstream of the app (its own AOAI resource and its backups) is cooling down, so the gateway probe drains the app. When every app is drained, Application Gateway answers 502 itself (no AOAI-shaped 429, no retry-after): leave off unless the apps have different capacity to offer. See infra/README.md.')
param healthReflectsCapacity bool = false

@description('Extra app settings for every Function App: [{ name, value }].')
param additionalAppSettings array = []

@description('Expiry of the secrets this deployment writes to Key Vault (rotate before it).')
param secretsExpireOn string = dateTimeAdd(utcNow(), 'P365D')

// ---------------------------------------------------------------------------------------------
// Services
// ---------------------------------------------------------------------------------------------

@description('Deploy Azure AI Content Safety and turn screening on (CONTENT_SAFETY_ENDPOINT).')
param deployContentSafety bool = true

@description('Deploy Cosmos DB for the abuse log and user registry.')
param deployCosmos bool = true

@description('Keep Cosmos DB account keys usable. Off: the apps use their identities.')
param cosmosAllowLocalAuth bool = false

@description('Cosmos DB serverless (pay per request) instead of autoscale throughput.')
param cosmosServerless bool = true

param cosmosDatabaseName string = 'fwdproxy'

@description('Create a private endpoint in the hub for each AOAI resource (off if they already have one resolvable from this network).')
param createAoaiPrivateEndpoints bool = true

@minValue(30)
@maxValue(730)
param logRetentionInDays int = 90

// ---------------------------------------------------------------------------------------------
// Functions
// ---------------------------------------------------------------------------------------------

@description('FlexConsumption (default): one FC1 plan per app, package in a blob container per app, published with func / VS Code. ElasticPremium: one EP plan per region, the apps run from a blob URL that infra/publish.sh writes.')
@allowed([
  'FlexConsumption'
  'ElasticPremium'
])
param hostingPlan string = 'FlexConsumption'

@description('Elastic Premium size of each regional plan.')
@allowed([
  'EP1'
  'EP2'
  'EP3'
])
param functionPlanSku string = 'EP1'

param functionMaxElasticWorkers int = 20

@description('Always-ready instances per app (Elastic Premium: minimumElasticInstanceCount; Flex: the http scale group).')
@minValue(1)
param functionMinInstances int = 1

@description('Zone redundancy (Elastic Premium: needs 3 always-ready instances; Flex: 2).')
param functionZoneRedundant bool = false

@description('Flex Consumption: instance memory (MB).')
@allowed([
  512
  2048
  4096
])
param flexInstanceMemoryMB int = 2048

@description('Flex Consumption: scale-out bound per app (the platform accepts 40..1000).')
@minValue(40)
@maxValue(1000)
param flexMaximumInstanceCount int = 100

@description('Flex Consumption: HTTP requests (streams included) one instance takes before another is added. 64 = CONTENT_SAFETY_MAX_CONCURRENT_REQUESTS default, so an instance is not handed more than it screens at once.')
@minValue(1)
@maxValue(1000)
param flexHttpPerInstanceConcurrency int = 64


// ---------------------------------------------------------------------------------------------
// Network
// ---------------------------------------------------------------------------------------------

param hubAddressPrefix string = '10.40.0.0/22'
param appGatewaySubnetPrefix string = '10.40.0.0/24'
param privateEndpointSubnetPrefix string = '10.40.1.0/24'

@description('Integration subnets (/26 or larger). Elastic Premium: one per Function App region, in order of first appearance in aoaiResources. Flex Consumption: one per app, in aoaiResources order (a Flex app needs its own subnet, delegated to Microsoft.App/environments).')
param integrationAddressPrefixes array = [
  '10.40.8.0/24'
  '10.40.9.0/24'
  '10.40.10.0/24'
  '10.40.11.0/24'
]

@description('A NAT gateway on each Function App integration subnet. With vnetRouteAllEnabled every outbound call enters the VNet, and Application Insights ingestion and Entra ID sign-in have no private endpoint here: they need a way out. Set false only when you provide one (a firewall route, or Azure Monitor Private Link for Application Insights plus egress for Entra ID).')
param deployNatGateway bool = true

@description('Public addresses or CIDRs of the machines that publish. Elastic Premium: allowed to upload the package to storage (a /32 is stripped, storage takes single addresses bare; storage rejects /31: list its two addresses). Flex Consumption: the only addresses each app\'s deployment endpoint (SCM site) admits, the one func and VS Code publish to. Empty: Premium publishes from inside the network; a Flex app admits no publisher until an address is added.')
param deployerIpRanges array = []

// ---------------------------------------------------------------------------------------------
// Application Gateway
// ---------------------------------------------------------------------------------------------

@description('Set false for a first run when the TLS certificate is not in Key Vault yet.')
param deployAppGateway bool = true

@description('Versionless Key Vault secret ID of the TLS certificate, e.g. https://<vault>.vault.azure.net/secrets/<cert-name>.')
param tlsCertificateSecretId string

@description('Vault holding the certificate; empty: the vault this deployment creates.')
param tlsCertificateKeyVaultName string = ''

@description('Resource group of tlsCertificateKeyVaultName.')
param tlsCertificateKeyVaultResourceGroup string = resourceGroup().name

param enableHttpRedirect bool = true

@allowed([
  'Prevention'
  'Detection'
])
param wafMode string = 'Prevention'

@maxValue(2000)
param wafMaxRequestBodySizeInKb int = 2000

param wafFileUploadLimitInMb int = 100

param appGatewayMinCapacity int = 2
param appGatewayMaxCapacity int = 10

@description('Availability zones for the gateway; empty for regions without zones.')
param appGatewayZones array = [
  '1'
  '2'
  '3'
]

@description('Backend request timeout (s). The Functions front end ends HTTP calls at 230 s.')
@minValue(1)
@maxValue(230)
param backendRequestTimeoutSeconds int = 230

@description('Probe interval (s). Default from appgw-probe.json, which the local gateway emulator reads too.')
param probeIntervalSeconds int = loadJsonContent('appgw-probe.json').intervalSeconds

@description('Probe timeout (s). Default from appgw-probe.json.')
param probeTimeoutSeconds int = loadJsonContent('appgw-probe.json').timeoutSeconds

@description('Failed probes before a backend leaves the pool. Default from appgw-probe.json.')
param probeUnhealthyThreshold int = loadJsonContent('appgw-probe.json').unhealthyThreshold

// ---------------------------------------------------------------------------------------------
// Derived names and values
// ---------------------------------------------------------------------------------------------

var probeFile = loadJsonContent('appgw-probe.json')
var rewriteRules = loadJsonContent('rewrite-rules.json').rewriteRules
var storageAccountName = toLower(take(replace('st${namePrefix}${uniqueString(resourceGroup().id)}', '-', ''), 24))
var keyVaultName = take('kv-${namePrefix}-${uniqueString(resourceGroup().id)}', 24)
var keyVaultSecretsBase = 'https://${keyVaultName}${environment().suffixes.keyvaultDns}/secrets/'
var packageContainerName = 'function-packages'
var packageBlobName = 'fwdproxy.zip'
var appLocations = [for a in aoaiResources: a.?appLocation ?? location]
var regions = union(appLocations, [])
var appNames = [for a in aoaiResources: 'fn${take(uniqueString(resourceGroup().id, a.name), 8)}-${namePrefix}-${take(toLower(a.name), 30)}']
var isFlex = hostingPlan == 'FlexConsumption'
// Flex: one deployment container per app (valid container names whatever the AOAI name is).
var deploymentContainerNames = [for a in aoaiResources: 'deploy-${uniqueString(resourceGroup().id, a.name)}']
// Flex: apps of one region, counted in order, each get their own subnet of that region's spoke.
var appIndexes = [for (a, j) in aoaiResources: j]
var appSlotInRegion = [for (a, i) in aoaiResources: length(filter(take(appLocations, i), l => l == appLocations[i]))]
var zoneNames = [
  'privatelink.openai.azure.com'
  'privatelink.cognitiveservices.azure.com'
  'privatelink.documents.azure.com'
  'privatelink.vaultcore.azure.net'
  'privatelink.blob.${environment().suffixes.storage}'
  'privatelink.queue.${environment().suffixes.storage}'
  'privatelink.table.${environment().suffixes.storage}'
]
var healthPath = probeFile.path
// Spillover: app i's backups are the other AOAI resources from the next one on, wrapping (the
// resources after i, then those before it), so each resource is the first backup of exactly one
// sibling and spilled load spreads out. Off with a single resource: it has no sibling.
// (Written with skip/take/concat, not map/range: checkov's Bicep parser knows neither.)
var appCount = length(aoaiResources)
var spillover = aoaiSpillover && appCount > 1
var backupIndexes = [for (a, i) in aoaiResources: concat(skip(appIndexes, i + 1), take(appIndexes, i))]
var backupAccounts = [for (a, i) in aoaiResources: concat(skip(aoaiResources, i + 1), take(aoaiResources, i))]
// Keyless: one role assignment per (app, sibling): entry x of this list is sibling
// backupIndexes[x / (n - 1)][x % (n - 1)] of app x / (n - 1) (every app has n - 1 backups).
var backupAccessTargets = flatten(backupIndexes)

// ---------------------------------------------------------------------------------------------
// Observability and network
// ---------------------------------------------------------------------------------------------

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    location: location
    namePrefix: namePrefix
    tags: tags
    retentionInDays: logRetentionInDays
  }
}

module network 'modules/network.bicep' = {
  name: 'network'
  params: {
    location: location
    namePrefix: namePrefix
    tags: tags
    addressPrefix: hubAddressPrefix
    appGatewaySubnetPrefix: appGatewaySubnetPrefix
    privateEndpointSubnetPrefix: privateEndpointSubnetPrefix
    allowHttpInbound: enableHttpRedirect
  }
}

module dns 'modules/private-dns-zone.bicep' = [for z in zoneNames: {
  name: 'dns-${z}'
  params: {
    zoneName: z
    hubVnetId: network.outputs.vnetId
    tags: tags
  }
}]

// Spokes add peerings to the hub: one at a time, or the hub update conflicts with itself.
@batchSize(1)
module spokes 'modules/spoke.bicep' = [for (r, i) in regions: {
  name: 'spoke-${r}'
  params: {
    location: r
    namePrefix: namePrefix
    tags: tags
    // Premium: the region's prefix. Flex: the prefixes of the region's apps, one subnet each.
    addressPrefixes: integrationAddressPrefixes
    prefixIndexes: isFlex ? filter(appIndexes, j => appLocations[j] == r) : [
      i
    ]
    delegation: isFlex ? 'Microsoft.App/environments' : 'Microsoft.Web/serverFarms'
    hubVnetName: network.outputs.vnetName
    privateDnsZoneNames: zoneNames
    deployNatGateway: deployNatGateway
  }
  dependsOn: [
    dns
  ]
}]

// ---------------------------------------------------------------------------------------------
// Shared services (private endpoints in the hub)
// ---------------------------------------------------------------------------------------------

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: {
    name: storageAccountName
    location: location
    tags: tags
    privateEndpointSubnetId: network.outputs.privateEndpointSubnetId
    privateDnsZoneIds: [
      dns[4].outputs.id
      dns[5].outputs.id
      dns[6].outputs.id
    ]
    // Flex: the deployers reach the app's deployment endpoint, not storage.
    deployerIpRanges: isFlex ? [] : deployerIpRanges
    packageContainerName: packageContainerName
    deploymentContainerNames: isFlex ? deploymentContainerNames : []
  }
}

module keyVault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  params: {
    name: keyVaultName
    location: location
    tags: tags
    privateEndpointSubnetId: network.outputs.privateEndpointSubnetId
    privateDnsZoneId: dns[3].outputs.id
  }
}

module cosmos 'modules/cosmos.bicep' = if (deployCosmos) {
  name: 'cosmos'
  params: {
    location: location
    namePrefix: namePrefix
    tags: tags
    privateEndpointSubnetId: network.outputs.privateEndpointSubnetId
    privateDnsZoneId: dns[2].outputs.id
    databaseName: cosmosDatabaseName
    abuseContainerName: 'abuse'
    usersContainerName: 'users'
    usageContainerName: 'usage'
    allowLocalAuth: cosmosAllowLocalAuth
    serverless: cosmosServerless
  }
}

module contentSafety 'modules/content-safety.bicep' = if (deployContentSafety) {
  name: 'content-safety'
  params: {
    location: location
    namePrefix: namePrefix
    tags: tags
    privateEndpointSubnetId: network.outputs.privateEndpointSubnetId
    privateDnsZoneId: dns[1].outputs.id
  }
}

// ---------------------------------------------------------------------------------------------
// Secrets: written by ARM (control plane), referenced from app settings by versionless URI
// ---------------------------------------------------------------------------------------------

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

// Inbound caller keys, only those that were given.
var inboundKeySecrets = concat(empty(inApiKey) ? [] : [
  {
    name: 'aoai-inapikey'
    value: inApiKey
  }
], empty(inApiKeys) ? [] : [
  {
    name: 'aoai-inapikeys'
    value: inApiKeys
  }
])

resource inboundSecrets 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = [for s in inboundKeySecrets: {
  parent: vault
  name: s.name
  properties: {
    value: s.value
    contentType: 'text/plain'
    attributes: {
      enabled: true
      exp: dateTimeToEpoch(secretsExpireOn)
    }
  }
  dependsOn: [
    keyVault
  ]
}]

resource aoaiAccounts 'Microsoft.CognitiveServices/accounts@2024-10-01' existing = [for a in aoaiResources: {
  name: a.name
  scope: resourceGroup(a.?subscriptionId ?? subscription().subscriptionId, a.resourceGroup)
}]

// Key mode only: the AOAI account key goes straight from the account into Key Vault, never
// through a parameter or an output.
resource outApiKeySecrets 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = [for (a, i) in aoaiResources: if (aoaiAuth == 'key') {
  parent: vault
  name: 'aoai-outapikey-${i}'
  properties: {
    value: aoaiAccounts[i].listKeys().key1
    contentType: 'text/plain'
    attributes: {
      enabled: true
      exp: dateTimeToEpoch(secretsExpireOn)
    }
  }
  dependsOn: [
    keyVault
  ]
}]

// ---------------------------------------------------------------------------------------------
// Function Apps: one plan per region, one app per AOAI resource
// ---------------------------------------------------------------------------------------------

module plans 'modules/function-plan.bicep' = [for r in regions: if (!isFlex) {
  name: 'plan-${r}'
  params: {
    location: r
    namePrefix: namePrefix
    tags: tags
    sku: functionPlanSku
    maximumElasticWorkerCount: functionMaxElasticWorkers
    zoneRedundant: functionZoneRedundant
  }
}]

// Flex: additionalAppSettings without the names Flex refuses (infra/flex-refused-settings.json).
var flexRefusedAppSettings = loadJsonContent('flex-refused-settings.json').appSettings
var flexAdditionalAppSettings = filter(additionalAppSettings, s => !contains(flexRefusedAppSettings, toUpper(s.name)))

// Spillover: the endpoint hosts of each app's backups, in order (read where the accounts live).
module aoaiBackups 'modules/aoai-backups.bicep' = [for (a, i) in aoaiResources: if (spillover) {
  name: 'aoai-backups-${i}'
  params: {
    backups: backupAccounts[i]
    backupIndexes: backupIndexes[i]
    keySecretUriPrefix: '${keyVaultSecretsBase}aoai-outapikey-'
  }
}]

module apps 'modules/function-app.bicep' = [for (a, i) in aoaiResources: if (!isFlex) {
  name: 'app-${i}'
  params: {
    name: appNames[i]
    location: appLocations[i]
    tags: tags
    planId: plans[indexOf(regions, appLocations[i])].outputs.id
    integrationSubnetId: spokes[indexOf(regions, appLocations[i])].outputs.integrationSubnetId
    appGatewaySubnetId: network.outputs.appGatewaySubnetId
    healthCheckPath: healthPath
    minimumInstances: functionMinInstances
    storageAccountName: storage.outputs.name
    keyVaultName: keyVaultName
    appInsightsName: monitoring.outputs.appInsightsName
    contentSafetyName: deployContentSafety ? contentSafety.outputs.name : ''
    appSettings: concat([
      {
        name: 'FUNCTIONS_EXTENSION_VERSION'
        value: '~4'
      }
      {
        name: 'FUNCTIONS_WORKER_RUNTIME'
        value: 'custom'
      }
      {
        // Identity-based host storage: no connection string anywhere.
        name: 'AzureWebJobsStorage__accountName'
        value: storage.outputs.name
      }
      {
        // The package infra/publish.sh uploads; read with the app's managed identity.
        name: 'WEBSITE_RUN_FROM_PACKAGE'
        value: '${storage.outputs.blobEndpoint}${packageContainerName}/${packageBlobName}'
      }
      {
        // Fetch that blob with the system-assigned identity (the default, stated explicitly).
        name: 'WEBSITE_RUN_FROM_PACKAGE_BLOB_MI_RESOURCE_ID'
        value: 'SystemAssigned'
      }
      {
        name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
        value: monitoring.outputs.appInsightsConnectionString
      }
      {
        name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING'
        value: 'Authorization=AAD'
      }
      {
        name: 'AOAI_HOSTNAME'
        value: replace(replace(aoaiAccounts[i].properties.endpoint, 'https://', ''), '/', '')
      }
      {
        name: 'AOAI_AUTH'
        value: aoaiAuth
      }
      {
        name: 'AOAI_TIMEOUT_MS'
        value: string(aoaiTimeoutMs)
      }
      {
        name: 'USER_CHECK'
        value: userCheck
      }
      {
        name: 'REGISTERED_USERS'
        value: registeredUsers
      }
    ], empty(inApiKey) ? [] : [
      {
        name: 'AOAI_INAPIKEY'
        value: '@Microsoft.KeyVault(SecretUri=${keyVaultSecretsBase}aoai-inapikey)'
      }
    ], empty(inApiKeys) ? [] : [
      {
        name: 'AOAI_INAPIKEYS'
        value: '@Microsoft.KeyVault(SecretUri=${keyVaultSecretsBase}aoai-inapikeys)'
      }
    ], aoaiAuth == 'key' ? [
      {
        name: 'AOAI_OUTAPIKEY'
        value: '@Microsoft.KeyVault(SecretUri=${keyVaultSecretsBase}aoai-outapikey-${i})'
      }
    ] : [], spillover ? [
      {
        name: 'AOAI_BACKUPS'
        value: join(aoaiBackups[i].outputs.hostNames, ',')
      }
    ] : [], spillover && aoaiAuth == 'key' ? [
      {
        name: 'AOAI_BACKUP_OUTAPIKEY_SECRET_URIS'
        value: join(aoaiBackups[i].outputs.keySecretUris, ',')
      }
    ] : [], healthReflectsCapacity ? [
      {
        name: 'HEALTH_REFLECTS_CAPACITY'
        value: 'true'
      }
    ] : [], deployContentSafety ? [
      {
        // No CONTENT_SAFETY_KEY: keys are disabled, the handler uses its managed identity.
        name: 'CONTENT_SAFETY_ENDPOINT'
        value: 'https://${contentSafety.outputs.name}.cognitiveservices.azure.com'
      }
    ] : [], deployCosmos ? [
      {
        // No COSMOS_KEY: the handler uses its managed identity (Built-in Data Contributor).
        name: 'COSMOS_ENDPOINT'
        value: cosmos.outputs.endpoint
      }
      {
        name: 'COSMOS_DATABASE'
        value: cosmosDatabaseName
      }
      {
        name: 'COSMOS_CONTAINER'
        value: 'abuse'
      }
      {
        name: 'COSMOS_USERS_CONTAINER'
        value: 'users'
      }
      {
        name: 'COSMOS_USAGE_CONTAINER'
        value: 'usage'
      }
    ] : [], empty(auditLogPath) ? [] : [
      {
        name: 'AUDIT_LOG_PATH'
        value: auditLogPath
      }
    ], additionalAppSettings)
  }
  dependsOn: [
    inboundSecrets
    outApiKeySecrets
  ]
}]

// Flex Consumption: one plan per app (a Flex plan holds one app), the package in the app's own
// deployment container, none of the app settings Flex refuses.
module flexApps 'modules/function-app-flex.bicep' = [for (a, i) in aoaiResources: if (isFlex) {
  name: 'app-flex-${i}'
  params: {
    name: appNames[i]
    location: appLocations[i]
    tags: tags
    integrationSubnetId: spokes[indexOf(regions, appLocations[i])].outputs.integrationSubnetIds[appSlotInRegion[i]]
    appGatewaySubnetId: network.outputs.appGatewaySubnetId
    deploymentContainerName: deploymentContainerNames[i]
    instanceMemoryMB: flexInstanceMemoryMB
    maximumInstanceCount: flexMaximumInstanceCount
    alwaysReadyInstances: functionMinInstances
    httpPerInstanceConcurrency: flexHttpPerInstanceConcurrency
    zoneRedundant: functionZoneRedundant
    deployerIpRanges: deployerIpRanges
    storageAccountName: storage.outputs.name
    keyVaultName: keyVaultName
    appInsightsName: monitoring.outputs.appInsightsName
    contentSafetyName: deployContentSafety ? contentSafety.outputs.name : ''
    // The same list as the Premium apps above minus the settings Flex refuses (runtime and
    // package are functionAppConfig there); check_structure.py keeps the two lists in step.
    appSettings: concat([
      {
        // Identity-based host storage: no connection string anywhere.
        name: 'AzureWebJobsStorage__accountName'
        value: storage.outputs.name
      }
      {
        name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
        value: monitoring.outputs.appInsightsConnectionString
      }
      {
        name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING'
        value: 'Authorization=AAD'
      }
      {
        name: 'AOAI_HOSTNAME'
        value: replace(replace(aoaiAccounts[i].properties.endpoint, 'https://', ''), '/', '')
      }
      {
        name: 'AOAI_AUTH'
        value: aoaiAuth
      }
      {
        name: 'AOAI_TIMEOUT_MS'
        value: string(aoaiTimeoutMs)
      }
      {
        name: 'USER_CHECK'
        value: userCheck
      }
      {
        name: 'REGISTERED_USERS'
        value: registeredUsers
      }
    ], empty(inApiKey) ? [] : [
      {
        name: 'AOAI_INAPIKEY'
        value: '@Microsoft.KeyVault(SecretUri=${keyVaultSecretsBase}aoai-inapikey)'
      }
    ], empty(inApiKeys) ? [] : [
      {
        name: 'AOAI_INAPIKEYS'
        value: '@Microsoft.KeyVault(SecretUri=${keyVaultSecretsBase}aoai-inapikeys)'
      }
    ], aoaiAuth == 'key' ? [
      {
        name: 'AOAI_OUTAPIKEY'
        value: '@Microsoft.KeyVault(SecretUri=${keyVaultSecretsBase}aoai-outapikey-${i})'
      }
    ] : [], spillover ? [
      {
        name: 'AOAI_BACKUPS'
        value: join(aoaiBackups[i].outputs.hostNames, ',')
      }
    ] : [], spillover && aoaiAuth == 'key' ? [
      {
        name: 'AOAI_BACKUP_OUTAPIKEY_SECRET_URIS'
        value: join(aoaiBackups[i].outputs.keySecretUris, ',')
      }
    ] : [], healthReflectsCapacity ? [
      {
        name: 'HEALTH_REFLECTS_CAPACITY'
        value: 'true'
      }
    ] : [], deployContentSafety ? [
      {
        // No CONTENT_SAFETY_KEY: keys are disabled, the handler uses its managed identity.
        name: 'CONTENT_SAFETY_ENDPOINT'
        value: 'https://${contentSafety.outputs.name}.cognitiveservices.azure.com'
      }
    ] : [], deployCosmos ? [
      {
        // No COSMOS_KEY: the handler uses its managed identity (Built-in Data Contributor).
        name: 'COSMOS_ENDPOINT'
        value: cosmos.outputs.endpoint
      }
      {
        name: 'COSMOS_DATABASE'
        value: cosmosDatabaseName
      }
      {
        name: 'COSMOS_CONTAINER'
        value: 'abuse'
      }
      {
        name: 'COSMOS_USERS_CONTAINER'
        value: 'users'
      }
      {
        name: 'COSMOS_USAGE_CONTAINER'
        value: 'usage'
      }
    ] : [], empty(auditLogPath) ? [] : [
      {
        name: 'AUDIT_LOG_PATH'
        value: auditLogPath
      }
    ], flexAdditionalAppSettings)
  }
  dependsOn: [
    inboundSecrets
    outApiKeySecrets
  ]
}]

// Cosmos DB data-plane access for each app, one assignment at a time: each PUT locks the whole
// account and a concurrent one fails with 412, which ARM does not retry.
@batchSize(1)
module cosmosAccess 'modules/cosmos-data-access.bicep' = [for (a, i) in aoaiResources: if (deployCosmos) {
  name: 'cosmos-access-${i}'
  params: {
    cosmosAccountName: deployCosmos ? cosmos.outputs.name : ''
    principalId: isFlex ? flexApps[i].outputs.principalId : apps[i].outputs.principalId
    assigneeKey: isFlex ? flexApps[i].outputs.id : apps[i].outputs.id
  }
}]

// Keyless AOAI access: "Cognitive Services OpenAI User" for each app on its own AOAI resource.
module aoaiAccess 'modules/aoai-access.bicep' = [for (a, i) in aoaiResources: {
  name: 'aoai-access-${i}'
  scope: resourceGroup(a.?subscriptionId ?? subscription().subscriptionId, a.resourceGroup)
  params: {
    aoaiName: a.name
    principalId: isFlex ? flexApps[i].outputs.principalId : apps[i].outputs.principalId
    appId: appNames[i]
  }
}]

// Spillover, keyless: the same role for each app on every sibling it may spill to (the handler
// sends the one Entra token to its own resource and to its backups).
module aoaiBackupAccess 'modules/aoai-access.bicep' = [for (j, x) in backupAccessTargets: if (spillover && aoaiAuth == 'managed_identity') {
  name: 'aoai-backup-access-${x / (appCount - 1)}-${j}'
  scope: resourceGroup(aoaiResources[j].?subscriptionId ?? subscription().subscriptionId, aoaiResources[j].resourceGroup)
  params: {
    aoaiName: aoaiResources[j].name
    principalId: isFlex ? flexApps[x / (appCount - 1)].outputs.principalId : apps[x / (appCount - 1)].outputs.principalId
    appId: appNames[x / (appCount - 1)]
  }
}]

module aoaiEndpoints 'modules/private-endpoint.bicep' = [for (a, i) in aoaiResources: if (createAoaiPrivateEndpoints) {
  name: 'pe-aoai-${i}'
  params: {
    name: 'pe-${namePrefix}-aoai-${i}'
    location: location
    tags: tags
    subnetId: network.outputs.privateEndpointSubnetId
    privateLinkServiceId: aoaiAccounts[i].id
    groupId: 'account'
    privateDnsZoneIds: [
      dns[0].outputs.id
      dns[1].outputs.id
    ]
  }
}]

// ---------------------------------------------------------------------------------------------
// Application Gateway
// ---------------------------------------------------------------------------------------------

resource gatewayIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: 'id-${namePrefix}-agw'
  location: location
  tags: tags
}

module gatewayCertificateAccess 'modules/vault-secret-reader.bicep' = {
  name: 'agw-certificate-access'
  scope: resourceGroup(tlsCertificateKeyVaultResourceGroup)
  params: {
    vaultName: empty(tlsCertificateKeyVaultName) ? keyVaultName : tlsCertificateKeyVaultName
    principalId: gatewayIdentity.properties.principalId
  }
  dependsOn: [
    keyVault
  ]
}

module gateway 'modules/appgw.bicep' = if (deployAppGateway) {
  name: 'appgw'
  params: {
    location: location
    namePrefix: namePrefix
    tags: tags
    subnetId: network.outputs.appGatewaySubnetId
    backendHostNames: [for (a, i) in aoaiResources: isFlex ? flexApps[i].outputs.defaultHostName : apps[i].outputs.defaultHostName]
    tlsCertificateSecretId: tlsCertificateSecretId
    identityId: gatewayIdentity.id
    rewriteRules: rewriteRules
    probe: {
      path: probeFile.path
      intervalSeconds: probeIntervalSeconds
      timeoutSeconds: probeTimeoutSeconds
      unhealthyThreshold: probeUnhealthyThreshold
      statusCodes: probeFile.statusCodes
    }
    requestTimeoutSeconds: backendRequestTimeoutSeconds
    enableHttpRedirect: enableHttpRedirect
    wafMode: wafMode
    wafMaxRequestBodySizeInKb: wafMaxRequestBodySizeInKb
    wafFileUploadLimitInMb: wafFileUploadLimitInMb
    minCapacity: appGatewayMinCapacity
    maxCapacity: appGatewayMaxCapacity
    zones: appGatewayZones
    logAnalyticsWorkspaceId: monitoring.outputs.workspaceId
  }
  dependsOn: [
    gatewayCertificateAccess
  ]
}

// ---------------------------------------------------------------------------------------------
// Outputs (infra/publish.sh reads hostingPlan, functionAppNames, storageAccountName,
// packageContainerName, packageBlobName)
// ---------------------------------------------------------------------------------------------

output hostingPlan string = hostingPlan
output functionAppNames array = [for (a, i) in aoaiResources: isFlex ? flexApps[i].outputs.name : apps[i].outputs.name]
output functionAppHostNames array = [for (a, i) in aoaiResources: isFlex ? flexApps[i].outputs.defaultHostName : apps[i].outputs.defaultHostName]
output storageAccountName string = storage.outputs.name
output packageContainerName string = packageContainerName
output packageBlobName string = packageBlobName
output deploymentContainerNames array = isFlex ? deploymentContainerNames : []
output keyVaultName string = keyVaultName
output appGatewayIdentityPrincipalId string = gatewayIdentity.properties.principalId
output appGatewayPublicIp string = deployAppGateway ? gateway.outputs.publicIpAddress : ''
output appGatewayFqdn string = deployAppGateway ? gateway.outputs.fqdn : ''
output healthPath string = healthPath
