// A private endpoint for one sub-resource of a PaaS service, registered in its private DNS zones.

param name string
param location string
param tags object = {}
param subnetId string

@description('Resource ID of the service to reach privately.')
param privateLinkServiceId string

@description('Sub-resource, e.g. account, Sql, vault, blob.')
param groupId string

@description('Private DNS zones that receive the endpoint\'s A records.')
param privateDnsZoneIds array

resource endpoint 'Microsoft.Network/privateEndpoints@2024-05-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    subnet: {
      id: subnetId
    }
    privateLinkServiceConnections: [
      {
        name: name
        properties: {
          privateLinkServiceId: privateLinkServiceId
          groupIds: [
            groupId
          ]
        }
      }
    ]
  }
}

resource dnsGroup 'Microsoft.Network/privateEndpoints/privateDnsZoneGroups@2024-05-01' = {
  parent: endpoint
  name: 'default'
  properties: {
    privateDnsZoneConfigs: [for (zoneId, i) in privateDnsZoneIds: {
      name: 'zone-${i}'
      properties: {
        privateDnsZoneId: zoneId
      }
    }]
  }
}

output id string = endpoint.id
