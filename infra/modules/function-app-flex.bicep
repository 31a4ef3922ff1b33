// One Function App on its own Flex Consumption plan (Linux, custom handler) in front of one AOAI
// resource: the hostingPlan = 'FlexConsumption' variant of function-plan.bicep + function-app.bicep.
//
// What differs from Elastic Premium, and why (see docs/deploy.md §7 for the sources):
// - A Flex plan holds exactly one app, so this module creates the plan with the app.
// - The runtime, the package and the scale settings live in functionAppConfig, not in app settings:
//   Flex refuses FUNCTIONS_WORKER_RUNTIME, FUNCTIONS_EXTENSION_VERSION, WEBSITE_RUN_FROM_PACKAGE,
//   WEBSITE_CONTENTSHARE, … (infra/tests/check_structure.py keeps that list out of this variant).
// - The package lives in a blob container of its own, read and written with a user-assigned
//   identity that holds its storage role before the app exists (Flex checks the container when
//   it creates the app; a system-assigned identity does not exist yet at that point). No storage
//   key and no Azure Files share anywhere. `func azure functionapp publish` and VS Code's
//   "Deploy to Function App" upload to the app's deployment endpoint, which writes that container.
// - The integration subnet is delegated to Microsoft.App/environments (spoke.bicep).
// - No vnetRouteAllEnabled: Flex sends the app's outbound traffic into the integration subnet
//   itself (WEBSITE_VNET_ROUTE_ALL is refused there); the subnet's NAT gateway stays the way out.
// - No healthCheckPath: Application Gateway's probe watches the handler's health route.
// Inbound stays as on Premium: only the Application Gateway subnet reaches the app; the SCM site
// (deployment endpoint) admits only deployerIpRanges, or nothing when it is empty.

param name string
param location string
param tags object = {}
param integrationSubnetId string

@description('The only subnet allowed to call the app (Application Gateway).')
param appGatewaySubnetId string

@description('App settings as [{name, value}]; none of the settings Flex refuses.')
param appSettings array

@description('This app\'s deployment container in storageAccountName (created by storage.bicep).')
param deploymentContainerName string

@description('Instance memory (MB).')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int

@description('Upper bound for scale-out (Flex accepts 40..1000).')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int

@description('Always-ready instances of the HTTP scale group: the gateway probe and the first client never wait for a cold start.')
@minValue(1)
param alwaysReadyInstances int

@description('Concurrent HTTP requests one instance takes before the platform adds another.')
@minValue(1)
@maxValue(1000)
param httpPerInstanceConcurrency int

@description('Spread instances over availability zones (needs at least 2 always-ready instances).')
param zoneRedundant bool

@description('Public addresses or CIDRs allowed on the SCM site (the deployment endpoint func and VS Code publish to); empty: no publisher is admitted until a rule is added.')
param deployerIpRanges array

param storageAccountName string
param keyVaultName string
param appInsightsName string

@description('Empty when Content Safety is not deployed.')
param contentSafetyName string

// The same grants as function-app.bicep (check_structure.py compares the two lists).
var roles = {
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  keyVaultSecretsUser: '4633458b-17de-408a-b874-0445c86b69e6'
  cognitiveServicesUser: 'a97b65f3-24c7-4388-baec-2e87135dc908'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
}
var storageRoles = [
  roles.storageBlobDataOwner
  roles.storageQueueDataContributor
  roles.storageTableDataContributor
]

// The deployment identity's only grant: read and write blobs in this app's container.
// Abuse-record journal: the same setting as on Elastic Premium. Where /home is not writable on
// an instance, the handler falls back to the temp directory with a warning (records there are
// per instance and shipped to Cosmos DB, the durable store, as soon as it answers).
var auditSettings = [
  {
    name: 'AUDIT_DIR'
    value: '/home/data/aoai-fwdproxy'
  }
]
var storageBlobDataContributor = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'

// Storage takes a bare address for one host; access restrictions want CIDR notation.
var scmRules = [for (ip, i) in deployerIpRanges: {
  name: 'allow-deployer-${i}'
  description: 'Deployer allowed to publish (deployerIpRanges).'
  action: 'Allow'
  priority: 100 + i
  ipAddress: contains(ip, '/') ? ip : '${ip}/32'
}]

// Reads and writes the deployment container (and nothing else); granted before the app exists.
resource deployIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: 'id-${name}-deploy'
  location: location
  tags: tags
}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName

  resource blobService 'blobServices' existing = {
    name: 'default'

    resource deploymentContainer 'containers' existing = {
      name: deploymentContainerName
    }
  }
}

resource deployStorageAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage::blobService::deploymentContainer.id, deployIdentity.id, storageBlobDataContributor)
  scope: storage::blobService::deploymentContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributor)
    principalId: deployIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  //checkov:skip=CKV_AZURE_225:Zone redundancy is a parameter (zoneRedundant): it needs at least two always-ready instances, so it is opt-in.
  //checkov:skip=CKV_AZURE_211:Flex Consumption has one SKU (FC1); capacity is set per app in functionAppConfig.scaleAndConcurrency.
  //checkov:skip=CKV_AZURE_212:Flex Consumption scales per app (maximumInstanceCount, always-ready instances); worker counts do not apply.
  name: 'plan-${name}'
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
    zoneRedundant: zoneRedundant
  }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  //checkov:skip=CKV_AZURE_222:Public endpoint stays on so Application Gateway can reach it through the Microsoft.Web service endpoint; ipSecurityRestrictions admit only the gateway subnet (default Deny).
  //checkov:skip=CKV_AZURE_17:Callers authenticate with the handler's internal API keys; Application Gateway terminates client TLS and does not present client certificates.
  //checkov:skip=CKV_AZURE_212:Flex Consumption keeps alwaysReady instances and scales out to maximumInstanceCount; numberOfWorkers applies to Dedicated plans.
  //checkov:skip=CKV_AZURE_16:The app has a managed identity: 'SystemAssigned, UserAssigned' (the check recognises only one type at a time).
  //checkov:skip=CKV_AZURE_213:No platform health check on Flex (healthCheckPath is not among Flex's documented site settings); Application Gateway probes the handler's health route and takes a failing app out of the pool.
  name: name
  location: location
  tags: tags
  kind: 'functionapp,linux'
  identity: {
    // System-assigned: host storage, Key Vault references, AOAI, Content Safety, Cosmos DB,
    // telemetry (as on Premium). User-assigned: the deployment container only.
    type: 'SystemAssigned, UserAssigned'
    userAssignedIdentities: {
      '${deployIdentity.id}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    reserved: true
    httpsOnly: true
    clientAffinityEnabled: false
    clientCertEnabled: false
    publicNetworkAccess: 'Enabled'
    virtualNetworkSubnetId: integrationSubnetId
    keyVaultReferenceIdentity: 'SystemAssigned'
    functionAppConfig: {
      runtime: {
        // The Flex stacks API lists the custom handler as runtime 'custom', version '1.0'.
        name: 'custom'
        version: '1.0'
      }
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: deployIdentity.id
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
        alwaysReady: [
          {
            name: 'http'
            instanceCount: alwaysReadyInstances
          }
        ]
        triggers: {
          http: {
            perInstanceConcurrency: httpPerInstanceConcurrency
          }
        }
      }
    }
    siteConfig: {
      appSettings: concat(appSettings, auditSettings)
      ftpsState: 'Disabled'
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      http20Enabled: true
      remoteDebuggingEnabled: false
      ipSecurityRestrictionsDefaultAction: 'Deny'
      ipSecurityRestrictions: [
        {
          name: 'allow-appgw-subnet'
          description: 'Only Application Gateway may call the handler.'
          action: 'Allow'
          priority: 100
          tag: 'Default'
          vnetSubnetResourceId: appGatewaySubnetId
        }
      ]
      // The deployment endpoint (SCM) that func and VS Code publish to: only the deployers.
      scmIpSecurityRestrictionsUseMain: false
      scmIpSecurityRestrictionsDefaultAction: 'Deny'
      scmIpSecurityRestrictions: scmRules
    }
  }
  dependsOn: [
    deployStorageAccess
  ]
}

// Publishing authenticates with Entra ID (az login / the VS Code Azure account): no basic auth.
resource ftpPolicy 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: site
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmPolicy 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: site
  name: 'scm'
  properties: {
    allow: false
  }
}

// Host storage (AzureWebJobsStorage__accountName).
resource storageAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for role in storageRoles: {
  name: guid(storage.id, site.id, role)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', role)
    principalId: site.identity.principalId
    principalType: 'ServicePrincipal'
  }
}]

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

// Key Vault references in app settings (over the VNet: network-restricted references on Flex).
resource vaultAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, site.id, roles.keyVaultSecretsUser)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsUser)
    principalId: site.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

// Entra ID telemetry ingestion (Application Insights local auth is off).
resource telemetryAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, site.id, roles.monitoringMetricsPublisher)
  scope: appInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.monitoringMetricsPublisher)
    principalId: site.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource contentSafety 'Microsoft.CognitiveServices/accounts@2024-10-01' existing = if (!empty(contentSafetyName)) {
  name: empty(contentSafetyName) ? 'unused' : contentSafetyName
}

resource contentSafetyAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(contentSafetyName)) {
  name: guid(contentSafety.id, site.id, roles.cognitiveServicesUser)
  scope: contentSafety
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.cognitiveServicesUser)
    principalId: site.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

output id string = site.id
output name string = site.name
output defaultHostName string = site.properties.defaultHostName
output principalId string = site.identity.principalId
output planName string = plan.name
