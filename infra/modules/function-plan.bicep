// One Linux Functions plan per region. Elastic Premium by default: it is the Functions plan that
// combines regional VNet integration (needed to reach AOAI, Cosmos DB, Key Vault and Content
// Safety over private endpoints) with event-driven scale-out and always-ready instances (no
// cold start on the first call after idle), and its function timeout is not capped at 10 min.
// The Azure front end still ends any HTTP call at 230 s; the handler's AOAI_TIMEOUT_MS stays below.

param location string
param namePrefix string
param tags object = {}

@allowed([
  'EP1'
  'EP2'
  'EP3'
])
param sku string

@description('Upper bound for elastic scale-out.')
param maximumElasticWorkerCount int

@description('Spread instances over availability zones (needs at least 3 always-ready instances).')
param zoneRedundant bool

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  //checkov:skip=CKV_AZURE_225:Zone redundancy is a parameter (zoneRedundant): it triples the always-ready baseline cost, so it is opt-in.
  name: 'plan-${namePrefix}-${location}'
  location: location
  tags: tags
  kind: 'elastic'
  sku: {
    name: sku
    tier: 'ElasticPremium'
  }
  properties: {
    reserved: true
    maximumElasticWorkerCount: maximumElasticWorkerCount
    zoneRedundant: zoneRedundant
  }
}

output id string = plan.id
output name string = plan.name
