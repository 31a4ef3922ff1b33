// Cosmos DB for NoSQL: the abuse log (container `abuse`, partitioned by /user), the user
// registry (container `users`, partitioned by /id) and the usage summaries (container `usage`,
// partitioned by /caller: one item per caller x user x deployment x minute and process). The handler uses Entra ID (data-plane RBAC);
// key auth stays off unless allowLocalAuth says otherwise.

param location string
param namePrefix string
param tags object = {}
param privateEndpointSubnetId string
param privateDnsZoneId string

param databaseName string
param abuseContainerName string
param usersContainerName string
param usageContainerName string

@description('Keep account keys usable (COSMOS_KEY). Off by default: the apps use managed identities.')
param allowLocalAuth bool

@description('Serverless capacity (pay per request) instead of provisioned throughput.')
param serverless bool

@description('Provisioned throughput per container when not serverless (autoscale maximum RU/s).')
param autoscaleMaxThroughput int = 1000

var name = toLower('cosmos-${namePrefix}-${uniqueString(resourceGroup().id)}')
var containerOptions = serverless ? {} : {
  autoscaleSettings: {
    maxThroughput: autoscaleMaxThroughput
  }
}

resource account 'Microsoft.DocumentDB/databaseAccounts@2024-11-15' = {
  //checkov:skip=CKV_AZURE_140:disableLocalAuth is !allowLocalAuth and allowLocalAuth defaults to false in main.bicep (cosmosAllowLocalAuth); keys stay off unless an operator opts in.
  name: name
  location: location
  tags: tags
  kind: 'GlobalDocumentDB'
  properties: {
    databaseAccountOfferType: 'Standard'
    enableMultipleWriteLocations: false
    locations: [
      {
        locationName: location
        failoverPriority: 0
        isZoneRedundant: false
      }
    ]
    consistencyPolicy: {
      defaultConsistencyLevel: 'Session'
    }
    capabilities: serverless ? [
      {
        name: 'EnableServerless'
      }
    ] : []
    publicNetworkAccess: 'Disabled'
    isVirtualNetworkFilterEnabled: false
    ipRules: []
    disableLocalAuth: !allowLocalAuth
    disableKeyBasedMetadataWriteAccess: true
    minimalTlsVersion: 'Tls12'
    backupPolicy: {
      type: 'Continuous'
      continuousModeProperties: {
        tier: 'Continuous7Days'
      }
    }
  }
}

resource database 'Microsoft.DocumentDB/databaseAccounts/sqlDatabases@2024-11-15' = {
  parent: account
  name: databaseName
  properties: {
    resource: {
      id: databaseName
    }
  }
}

resource abuse 'Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers@2024-11-15' = {
  parent: database
  name: abuseContainerName
  properties: {
    resource: {
      id: abuseContainerName
      partitionKey: {
        paths: [
          '/user'
        ]
        kind: 'Hash'
      }
    }
    options: containerOptions
  }
}

resource users 'Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers@2024-11-15' = {
  parent: database
  name: usersContainerName
  properties: {
    resource: {
      id: usersContainerName
      partitionKey: {
        paths: [
          '/id'
        ]
        kind: 'Hash'
      }
    }
    options: containerOptions
  }
}

resource usage 'Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers@2024-11-15' = {
  parent: database
  name: usageContainerName
  properties: {
    resource: {
      id: usageContainerName
      partitionKey: {
        paths: [
          '/caller'
        ]
        kind: 'Hash'
      }
    }
    options: containerOptions
  }
}

module endpoint 'private-endpoint.bicep' = {
  name: 'pe-${name}'
  params: {
    name: 'pe-${name}'
    location: location
    tags: tags
    subnetId: privateEndpointSubnetId
    privateLinkServiceId: account.id
    groupId: 'Sql'
    privateDnsZoneIds: [
      privateDnsZoneId
    ]
  }
}

output id string = account.id
output name string = account.name
output endpoint string = account.properties.documentEndpoint
