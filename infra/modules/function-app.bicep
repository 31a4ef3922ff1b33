// One Function App (Linux, custom handler) in front of one AOAI resource, with its identity's
// role assignments on the shared services in this resource group. Inbound: only the Application
// Gateway subnet (access restriction, default deny). Outbound: all traffic through the VNet, so
// every dependency is reached on its private endpoint.

param name string
param location string
param tags object = {}
param planId string
param integrationSubnetId string

@description('The only subnet allowed to call the app (Application Gateway).')
param appGatewaySubnetId string

@description('App settings as [{name, value}].')
param appSettings array

@description('Health path the platform and the gateway probe (anonymous route of the handler).')
param healthCheckPath string

@description('Always-ready instances (Elastic Premium): no cold start on the first call.')
param minimumInstances int

param storageAccountName string
param keyVaultName string
param appInsightsName string

@description('Empty when Content Safety is not deployed.')
param contentSafetyName string

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

resource site 'Microsoft.Web/sites@2024-04-01' = {
  //checkov:skip=CKV_AZURE_222:Public endpoint stays on so Application Gateway can reach it through the Microsoft.Web service endpoint; ipSecurityRestrictions admit only the gateway subnet (default Deny).
  //checkov:skip=CKV_AZURE_17:Callers authenticate with the handler's internal API keys; Application Gateway terminates client TLS and does not present client certificates.
  //checkov:skip=CKV_AZURE_212:Elastic Premium keeps minimumElasticInstanceCount always-ready instances and scales out on load; numberOfWorkers applies to Dedicated plans.
  name: name
  location: location
  tags: tags
  kind: 'functionapp,linux'
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    serverFarmId: planId
    reserved: true
    httpsOnly: true
    clientAffinityEnabled: false
    clientCertEnabled: false
    publicNetworkAccess: 'Enabled'
    virtualNetworkSubnetId: integrationSubnetId
    vnetRouteAllEnabled: true
    keyVaultReferenceIdentity: 'SystemAssigned'
    siteConfig: {
      // Custom handlers on Linux use the generic runtime image: no language stack to pin.
      linuxFxVersion: ''
      appSettings: appSettings
      ftpsState: 'Disabled'
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      http20Enabled: true
      remoteDebuggingEnabled: false
      healthCheckPath: healthCheckPath
      minimumElasticInstanceCount: minimumInstances
      preWarmedInstanceCount: 1
      functionsRuntimeScaleMonitoringEnabled: false
      vnetRouteAllEnabled: true
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
      // The package is published to blob storage, so nothing needs Kudu/SCM: deny it entirely.
      scmIpSecurityRestrictionsUseMain: false
      scmIpSecurityRestrictionsDefaultAction: 'Deny'
      scmIpSecurityRestrictions: []
    }
  }
}

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

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

// Host storage (AzureWebJobsStorage__accountName) and reading the run-from-package blob.
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

// Key Vault references in app settings.
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
